"""
The C{tproxy-twist} command: what an operator runs next to the daemon.

    tproxy-twist check [--config F]   is this machine ready for the configured tproxy ports?
    tproxy-twist rules [--config F]   the set-up script for them (nftables or --iptables)
    tproxy-twist lab [--keep]         the whole path at work, in throwaway namespaces
    tproxy-twist ca init|show         the CA for TLS bump: create it, or show how to install it
    tproxy-twist status [--watch]     what the running proxy is doing (its /status.json)

A mistake in the configuration prints the configuration error and exits 2;
no traceback reaches the user for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TextIO

from . import config as configuration
from .config import Config, ConfigError
from .preflight import run_checks
from .rules import divert_ports, render_for_config
from .tap import version

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    """A mistake on the command line or in the configuration: message, exit 2."""


def _load(path: str | None) -> Config:
    try:
        return configuration.load(path) if path else configuration.load_default()
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


def cmd_lab(args: argparse.Namespace, out: TextIO) -> int:
    from .lab import scenario

    if os.geteuid() != 0:
        raise _Usage("tproxy-twist lab: needs root (it creates network namespaces)")
    if args.clean:
        return scenario.clean(out)
    missing = [tool for tool in ("ip", "nft", "curl", "ss") if shutil.which(tool) is None]
    if missing:
        raise _Usage(
            f"tproxy-twist lab: {', '.join(missing)} not found (apt install iproute2 nftables curl)"
        )
    config = _load(args.config) if args.config else None
    if config is not None and not divert_ports(config):
        raise _Usage(f'{config.path}: no port has mode = "tproxy": the lab has nothing to show')
    return scenario.run(config, out, keep=args.keep)


# --- the command line -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    config_help = (
        "the TOML configuration (default: the first that exists of"
        f" {', '.join(configuration.default_paths())})"
    )
    parser = argparse.ArgumentParser(
        prog="tproxy-twist",
        description="Operator tools for tproxy-twist, the transparent (TPROXY) HTTP proxy.",
        epilog="Exit status: 0 success, 1 a check or a lab request failed,"
        " 2 a mistake in the command line or the configuration.",
    )
    parser.add_argument("--version", action="version", version=f"tproxy-twist {version()}")
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

    from .ca_cli import add_ca_parser  # `tproxy-twist ca init|show`; cheap: no cryptography

    add_ca_parser(commands, config_help, _Usage)
    from .status_cli import add_status_parser  # `tproxy-twist status [--url] [--watch]`

    add_status_parser(commands, config_help, _Usage)
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
