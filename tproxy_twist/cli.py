"""
The C{tproxy-twist} command: what an operator runs next to the daemon.

    tproxy-twist check [--config F]   is this machine ready for the configured tproxy ports?
    tproxy-twist rules [--config F]   the set-up script for them (nftables or --iptables)
    tproxy-twist lab [--keep]         the whole path at work, in throwaway namespaces

A mistake in the configuration prints the configuration error and exits 2;
no traceback reaches the user for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import attrs

from . import config as configuration
from .config import Config, ConfigError
from .preflight import run_checks
from .rules import divert_ports, render_for_config, serves_ipv6

__all__ = ["LAB_CONFIG", "default_config_path", "main"]

SYSTEM_CONFIG = "/etc/tproxy-twist/tproxy.toml"
# A checkout's sample, for running from the source tree.
_CHECKOUT_CONFIG = Path(__file__).resolve().parents[1] / "etc" / "tproxy.toml"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def default_config_path() -> str:
    """
    The first of C{/etc/tproxy-twist/tproxy.toml}, C{./etc/tproxy.toml}
    (run from a checkout) and the checkout's own C{etc/tproxy.toml} that
    exists; C{/etc/tproxy-twist/tproxy.toml} when none does (so the error
    names the file an installed proxy expects).
    """
    for candidate in (SYSTEM_CONFIG, "etc/tproxy.toml", str(_CHECKOUT_CONFIG)):
        if os.path.isfile(candidate):
            return candidate
    return SYSTEM_CONFIG


class _Usage(Exception):
    """A mistake on the command line or in the configuration: message, exit 2."""


def _load(path: str | None) -> Config:
    try:
        return configuration.load(path or default_config_path())
    except ConfigError as e:
        raise _Usage(str(e)) from None


# --- check ---------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args.config)
    checks = run_checks(config, ipv4_only=args.ipv4_only)
    tproxy = [p for p in config.ports if p.mode == "tproxy"]
    if not checks:
        out.write(f"{config.path}: no tproxy port: nothing to check\n")
        return EXIT_OK
    ports = ", ".join(
        f"{p.name} {p.listen} (divert {','.join(map(str, p.divert))})" for p in tproxy
    )
    out.write(f"tproxy-twist check: {config.path}: tproxy {ports}\n")
    for check in checks:
        for line in check.lines():
            out.write(line + "\n")
    missing = [c for c in checks if not c.ok]
    if missing:
        out.write(
            f"{len(missing)} of {len(checks)} checks missing: run the fix commands above"
            " (as root), then check again\n"
        )
        return EXIT_FAILED
    out.write(f"all {len(checks)} checks passed\n")
    return EXIT_OK


# --- rules ---------------------------------------------------------------------------


def cmd_rules(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args.config)
    try:
        script = render_for_config(
            config,
            iptables=args.iptables,
            ipv4_only=args.ipv4_only,
            kernel_settings=not args.no_sysctl,
            block_quic=args.block_quic,
        )
    except ValueError as e:
        raise _Usage(str(e)) from None
    out.write(script)
    return EXIT_OK


# --- lab -------------------------------------------------------------------------------

# etc/tproxy.toml, with the lab's client networks allowed on the forward port,
# the access log in the lab's directory and short timeouts.
LAB_CONFIG = """\
# tproxy-twist lab: etc/tproxy.toml, with the lab client's networks
# (198.51.100.0/24, 2001:db8:1::/64) allowed on the forward port.
workers = 2
drain_timeout = 5.0

[access_log]
path = {access_log}
format = "squid"

[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 5.0
response = 10.0

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128",
         "fc00::/7", "fe80::/10", "198.51.100.0/24", "2001:db8:1::/64"]
connect_ports = [443]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
spoof_client_ip = true
divert = [80]
allow = ["0.0.0.0/0", "::/0"]

[[port]]
name = "tls"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
divert = [443]
allow = ["0.0.0.0/0", "::/0"]
"""

# The metrics worth showing beside what the origin saw.
_LAB_METRICS = (
    "tproxy_requests_total",
    "tproxy_connections_total",
    "tproxy_bytes_total",
    "tproxy_upstream_errors_total",
    "tproxy_rejected_total",
    "tproxy_workers",
)


@attrs.frozen
class LabRequest:
    label: str
    argv: tuple[str, ...]  # curl arguments after the common ones
    client: str  # the client's own address
    expect: str  # the address the origin should see
    why: str  # what that address means


def _lab_requests(config: Config, lab_cls, diverted: int, direct: int) -> list[LabRequest]:
    requests = []
    tproxy = next(p for p in config.ports if p.mode == "tproxy")
    spoof = tproxy.spoof_client_ip
    families = [(lab_cls.CLIENT4, lab_cls.ORIGIN4, lab_cls.ROUTER_ORIGIN4, "IPv4")]
    if serves_ipv6(config):
        families.append((lab_cls.CLIENT6, f"[{lab_cls.ORIGIN6}]", lab_cls.ROUTER_ORIGIN6, "IPv6"))
    for client, origin, router, name in families:
        url = f"http://{origin}{'' if diverted == 80 else f':{diverted}'}/ip"
        requests.append(
            LabRequest(
                f"{name} GET {url} (diverted to :{tproxy.listen.port})",
                (url,),
                client,
                client if spoof else router,
                "the client's own address" if spoof else "the router's address (no spoofing)",
            )
        )
    forward = next((p for p in config.ports if p.mode == "forward"), None)
    if forward is not None:
        proxy_host = {
            "0.0.0.0": lab_cls.ROUTER_CLIENT4,
            "::": lab_cls.ROUTER_CLIENT4,
            lab_cls.ROUTER_CLIENT4: lab_cls.ROUTER_CLIENT4,
        }.get(forward.listen.host)
        if proxy_host is not None:
            url = f"http://{lab_cls.ORIGIN4}:{direct}/ip"
            proxy = f"http://{proxy_host}:{forward.listen.port}"
            requests.append(
                LabRequest(
                    f"IPv4 GET {url} via forward port :{forward.listen.port}",
                    ("--proxy", proxy, url),
                    lab_cls.CLIENT4,
                    lab_cls.ROUTER_ORIGIN4,
                    "the router's address (forward ports do not spoof)",
                )
            )
    return requests


def _listen_ports(config: Config) -> list[int]:
    ports = [p.listen.port for p in config.ports]
    if config.metrics_listen is not None:
        ports.append(config.metrics_listen.port)
    return ports


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def cmd_lab(args: argparse.Namespace, out: TextIO) -> int:
    from .lab import Lab, cleanup_stale
    from .lab.topology import child_env

    if os.geteuid() != 0:
        raise _Usage("tproxy-twist lab: needs root (it creates network namespaces)")
    if args.clean:
        removed = cleanup_stale()
        for prefix in sorted({name.rsplit("-", 1)[0] for name in removed}):
            for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        out.write(
            f"removed {', '.join(removed)}\n" if removed else "no kept or stale lab to remove\n"
        )
        return EXIT_OK
    missing = [tool for tool in ("ip", "nft", "curl", "ss") if shutil.which(tool) is None]
    if missing:
        raise _Usage(
            f"tproxy-twist lab: {', '.join(missing)} not found (apt install iproute2 nftables curl)"
        )
    config = _load(args.config) if args.config else None
    if config is not None and not divert_ports(config):
        raise _Usage(f'{config.path}: no port has mode = "tproxy": the lab has nothing to show')

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    lab = Lab()
    keep = False
    try:
        out.write(f"tproxy-twist lab: building {', '.join(lab.namespaces)}\n")
        lab.setup()
        assert lab.tmpdir is not None
        if config is None:
            path = lab.tmpdir / "tproxy.toml"
            access_log = json.dumps(str(lab.tmpdir / "access.log"))
            path.write_text(LAB_CONFIG.format(access_log=access_log))
            config = _load(str(path))
        status = _run_lab(lab, config, out, child_env)
        keep = args.keep
        if keep:
            _print_keep(lab, out)
        return status
    except _Terminated:
        out.write("tproxy-twist lab: terminated; removing the lab\n")
        return EXIT_FAILED
    except Exception as e:  # a failed step: say which, then remove everything
        out.write(f"tproxy-twist lab: failed: {e}\n")
        return EXIT_FAILED
    finally:
        if not keep:
            lab.teardown()
            out.write(f"tproxy-twist lab: removed {', '.join(lab.namespaces)}\n")
        signal.signal(signal.SIGTERM, previous)


def _run_lab(lab, config: Config, out: TextIO, child_env) -> int:
    assert lab.tmpdir is not None
    script = render_for_config(config)
    lab.apply_rules(script)
    out.write("router: applied `tproxy-twist rules` (nftables, policy routing, sysctls)\n")

    tproxy = next(p for p in config.ports if p.mode == "tproxy")
    diverted = tproxy.divert[0]
    all_diverted = {d for p in config.ports if p.mode == "tproxy" for d in p.divert}
    direct = next(p for p in range(8080, 9000) if p not in all_diverted)
    lab.start_origin(tuple(sorted({diverted, direct})))
    out.write(f"origin: serving on ports {diverted} (diverted) and {direct} (not diverted)\n")

    from .lab import TWISTD

    log_path = lab.tmpdir / "proxy.log"
    argv = [*TWISTD, "-n", "--pidfile=", "tproxy", "--config", os.path.abspath(config.path)]
    with open(log_path, "ab") as log_file:
        proxy = lab.popen(
            lab.router,
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=lab.tmpdir,
            env=child_env(),
            start_new_session=True,
        )
    try:
        lab.wait_listening(lab.router, _listen_ports(config), proxy, log_path, timeout=30)
    except RuntimeError as e:
        out.write(f"router: twistd tproxy {e}\n")
        return EXIT_FAILED
    out.write(f"router: twistd tproxy (pid {proxy.pid}) listening on {_listen_ports(config)}\n\n")
    _wait_for_ipv6(lab)

    failures = 0
    out.write(f"{'request':<60} {'client':<15} {'origin saw':<15}\n")
    for request in _lab_requests(config, type(lab), diverted, direct):
        result = lab.run(
            lab.client,
            ["curl", "--silent", "--show-error", "--max-time", "15", *request.argv],
            check=False,
            timeout=30,
        )
        try:
            seen = json.loads(result.stdout)["client"]
        except (ValueError, KeyError, TypeError):
            seen = None
        if seen == request.expect:
            verdict = f"ok: {request.why}"
        else:
            failures += 1
            answer = (result.stdout or result.stderr).decode(errors="replace").strip()
            verdict = f"FAILED: expected {request.expect} ({request.why}); got {answer[:200]!r}"
        out.write(f"{request.label:<60} {request.client:<15} {seen or '-':<15} {verdict}\n")

    if config.metrics_listen is not None:
        time.sleep(0.5)  # workers hand their counts to /metrics a few times a second
        _print_metrics(lab, config, out)
    _print_access_log(config, out)
    check = lab.run(
        lab.router,
        [sys.executable, "-m", "tproxy_twist.cli", "check", "--config", config.path],
        check=False,
    )
    out.write("\nrouter: tproxy-twist check\n")
    out.write(_indent(check.stdout.decode(errors="replace")))
    if failures:
        out.write(f"\n{failures} request(s) did not show the expected address\n")
        return EXIT_FAILED
    out.write("\nthe transparent path works: the origin saw the client's own address\n")
    return EXIT_OK


def _wait_for_ipv6(lab, timeout: float = 5.0) -> None:
    """Wait until the router's link-local addresses have passed duplicate address
    detection: until then the first IPv6 flow through it stalls for a second or two."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tentative = lab.run(lab.router, ["ip", "-6", "addr", "show", "tentative"], check=False)
        if not tentative.stdout.strip():
            return
        time.sleep(0.1)


def _print_metrics(lab, config: Config, out: TextIO) -> None:
    listen = config.metrics_listen
    assert listen is not None
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(listen.host, listen.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"http://{host}:{listen.port}/metrics"
    result = lab.run(lab.router, ["curl", "--silent", "--max-time", "10", url], check=False)
    lines = [
        line
        for line in result.stdout.decode(errors="replace").splitlines()
        if line.startswith(_LAB_METRICS) and not line.endswith(" 0.0")  # zeros say nothing
    ]
    out.write(f"\nrouter: {url}\n")
    out.write(_indent("\n".join(lines) + "\n") if lines else "  (no tproxy metrics)\n")


def _print_access_log(config: Config, out: TextIO) -> None:
    path = config.access_log.path
    if not path:
        return
    # The writer thread flushes within milliseconds; give it a moment.
    deadline = time.monotonic() + 2
    text = ""
    while time.monotonic() < deadline:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = ""
        if text:
            break
        time.sleep(0.1)
    out.write(f"\nrouter: access log {path}\n")
    out.write(_indent(text) if text else "  (empty: this proxy wrote no access log lines)\n")


def _print_keep(lab, out: TextIO) -> None:
    out.write("\nThe lab is still up (--keep). Enter a namespace with:\n")
    for ns, what in (
        (lab.client, f"the client, {lab.CLIENT4} and {lab.CLIENT6}"),
        (lab.router, "the router: the proxy, `nft list ruleset`, `tproxy-twist check`"),
        (lab.origin, f"the origin server, {lab.ORIGIN4} and {lab.ORIGIN6}"),
    ):
        out.write(f"  ip netns exec {ns} bash    # {what}\n")
    out.write(
        f"Files (config, proxy.log, origin.log): {lab.tmpdir}\n"
        "Remove it with: tproxy-twist lab --clean\n"
    )


def _indent(text: str) -> str:
    return "".join(f"  {line}\n" for line in text.splitlines())


# --- the command line -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    config_help = (
        "the TOML configuration (default: the first that exists of"
        f" {SYSTEM_CONFIG}, ./etc/tproxy.toml and the source checkout's etc/tproxy.toml)"
    )
    parser = argparse.ArgumentParser(
        prog="tproxy-twist",
        description="Operator tools for tproxy-twist, the transparent (TPROXY) HTTP proxy.",
        epilog="Exit status: 0 success, 1 a check or a lab request failed,"
        " 2 a mistake in the command line or the configuration.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="check this machine for what the configured tproxy ports need",
        description="Check, for every configured tproxy port and family, what a working"
        " TPROXY path needs: transparent bind, capability, fwmark policy routing, the"
        " nftables/iptables TPROXY and socket rules, forwarding, rp_filter and"
        " tcp_migrate_req. One line per check (ok / missing), with the command that"
        " fixes each missing one. Run as root. Exit 0 only when all pass.",
    )
    check.add_argument("--config", "-c", metavar="FILE", help=config_help)
    check.add_argument(
        "--ipv4-only", action="store_true", help="skip IPv6 (as `rules --ipv4-only` set up)"
    )
    check.set_defaults(run=cmd_check)

    rules = commands.add_parser(
        "rules",
        help="print the set-up script for the configured tproxy ports",
        description="Print a POSIX sh script that sets up TPROXY for every configured tproxy"
        " port: nftables (or iptables) rules diverting its `divert` ports to it, the"
        " `socket` rule, fwmark policy routing, and the kernel settings (forwarding,"
        " loose rp_filter, tcp_migrate_req). Idempotent. Apply it with"
        " `tproxy-twist rules | sh -e`.",
    )
    rules.add_argument("--config", "-c", metavar="FILE", help=config_help)
    rules.add_argument(
        "--iptables", action="store_true", help="iptables (the Squid wiki's DIVERT recipe)"
    )
    rules.add_argument("--ipv4-only", action="store_true", help="leave IPv6 alone")
    rules.add_argument(
        "--no-sysctl", action="store_true", help="leave the kernel settings (sysctls) alone"
    )
    rules.add_argument(
        "--block-quic",
        action="store_true",
        help="reject QUIC (UDP to the diverted ports) from the clients of every TLS port, even"
        " those with block_quic = false, so that browsers fall back to TCP",
    )
    rules.set_defaults(run=cmd_rules)

    lab = commands.add_parser(
        "lab",
        help="show the whole transparent path working, in throwaway network namespaces",
        description="Build a client/router/origin lab in network namespaces (documentation"
        " addresses only; the host's own network is not touched), apply `rules` in the"
        " router, run `twistd -n tproxy` there, send requests from the client (IPv4, IPv6,"
        " and one via the forward port), print what the origin saw and the metrics, then"
        " remove everything. Root only. Without --config it uses etc/tproxy.toml's settings"
        " with the lab client allowed on the forward port.",
    )
    lab.add_argument("--config", "-c", metavar="FILE", help="the configuration to run")
    mode = lab.add_mutually_exclusive_group()
    mode.add_argument(
        "--keep", action="store_true", help="leave the lab up, and print how to enter it"
    )
    mode.add_argument(
        "--clean", action="store_true", help="remove labs left up by --keep (or a crash)"
    )
    lab.set_defaults(run=cmd_lab)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        return args.run(args, out)
    except _Usage as e:
        err.write(f"{e}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # `tproxy-twist rules | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
