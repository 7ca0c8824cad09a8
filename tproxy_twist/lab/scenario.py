"""
The lab scenario behind C{tproxy-twist lab}: build the namespaces, apply
C{tproxy-twist rules} in the router, run the proxy there, send requests from
the client (IPv4, IPv6 and one through the forward port), and print what the
origin saw, the metrics, the access log and C{tproxy-twist check}.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import attrs

from tproxy_twist import config as configuration
from tproxy_twist.config import Config
from tproxy_twist.lab.topology import Lab, cleanup_stale
from tproxy_twist.rules import render_for_config, serves_ipv6

__all__ = ["LAB_CONFIG", "clean", "run"]

OK, FAILED = 0, 1


def run(config: Config | None, out: TextIO, *, keep: bool = False) -> int:
    """
    Run the scenario (with C{config}, or the built-in L{LAB_CONFIG}); remove
    the lab afterwards unless C{keep}.  Returns 0 when the origin saw every
    address it should have, 1 otherwise (or when a step failed: it says which).
    """
    lab = Lab()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    kept = False
    try:
        out.write(f"tproxy-twist lab: building {', '.join(lab.namespaces)}\n")
        lab.setup()
        assert lab.tmpdir is not None
        if config is None:
            path = lab.tmpdir / "tproxy.toml"
            access_log = json.dumps(str(lab.tmpdir / "access.log"))
            path.write_text(LAB_CONFIG.format(access_log=access_log))
            config = configuration.load(str(path))
        status = _run_lab(lab, config, out)
        if keep:
            lab.keep()
            kept = True
            _print_keep(lab, out)
        return status
    except _Terminated:
        out.write("tproxy-twist lab: terminated; removing the lab\n")
        return FAILED
    except Exception as e:  # a failed step: say which, then remove everything
        out.write(f"tproxy-twist lab: failed: {e}\n")
        return FAILED
    finally:
        if not kept:
            lab.teardown()
            out.write(f"tproxy-twist lab: removed {', '.join(lab.namespaces)}\n")
        signal.signal(signal.SIGTERM, previous)


def clean(out: TextIO) -> int:
    """Remove labs left up by C{--keep}, or by a crash, with their temporary directories."""
    removed = cleanup_stale(kept=True)
    for prefix in sorted({name.rsplit("-", 1)[0] for name in removed}):
        for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    out.write(f"removed {', '.join(removed)}\n" if removed else "no kept or stale lab to remove\n")
    return OK


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
listen = "[::]:3128"
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


def _run_lab(lab: Lab, config: Config, out: TextIO) -> int:
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

    log_path = lab.tmpdir / "proxy.log"
    try:
        proxy = lab.start_proxy(
            config.path, log_path, ports=_listen_ports(config), cwd=lab.tmpdir, timeout=30
        )
    except RuntimeError as e:
        out.write(f"router: twistd tproxy {e}\n")
        return FAILED
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
        return FAILED
    out.write("\nthe transparent path works: the origin saw the client's own address\n")
    return OK


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
