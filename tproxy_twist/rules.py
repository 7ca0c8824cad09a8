"""The packet-diverting set-up for tproxy ports, rendered as a POSIX ``sh`` script.

Two flavours: nftables (:func:`render_nftables`) and the iptables "DIVERT"
recipe from the Squid wiki (:func:`render_iptables`). Each script

- applies cleanly with ``sh -e`` as root (or with CAP_NET_ADMIN) in a fresh
  network namespace, and
- is idempotent: running it again leaves the same rules, routes and policy
  rules, without errors.

Behaviour when no proxy is listening differs between the two, and is part of
what a caller may rely on (the end-to-end tests in ``tests/e2e/test_lab.py``
assert it on a real kernel):

- nftables ``tproxy`` finds no socket, the rest of the rule is skipped and the
  packet is routed on to the original destination, unproxied (fail-open);
- iptables ``TPROXY`` finds no socket and drops the packet (fail-closed: the
  client's SYN goes unanswered).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "QuicBlock",
    "quic_blocks",
    "DEFAULT_MARK",
    "DEFAULT_TABLE",
    "DivertPort",
    "divert_ports",
    "nftables_ruleset",
    "render_for_config",
    "render_iptables",
    "render_kernel_settings",
    "render_nftables",
    "serves_ipv6",
]

NFT_TABLE = "tproxy_twist"
IPT_CHAIN = "TPROXY_TWIST"
IPT_QUIC_CHAIN = "TPROXY_TWIST_QUIC"

# The Squid wiki's numbers: packets marked 1 are looked up in routing table 100.
DEFAULT_MARK = 1
DEFAULT_TABLE = 100

# Routing tables the kernel already uses (unspec, default, main, local).
_RESERVED_TABLES = frozenset({0, 253, 254, 255})


def _check_port(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be a TCP port number 1-65535, got {value!r}")


def _validate_listen_port(instance: object, attribute: attrs.Attribute, value: int) -> None:
    _check_port(value, "listen_port")


def _validate_divert(instance: object, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        raise ValueError("divert must name at least one destination port")
    for port in value:
        _check_port(port, "divert port")
    if len(set(value)) != len(value):
        raise ValueError(f"divert lists a port twice: {value!r}")


@attrs.frozen
class DivertPort:
    """What the rules need to know about one tproxy listener.

    ``listen_port`` is the proxy's tproxy listener (e.g. 3129); ``divert`` are
    the destination ports whose forwarded TCP traffic is handed to it.
    """

    listen_port: int = attrs.field(validator=_validate_listen_port)
    divert: tuple[int, ...] = attrs.field(
        default=(80,), converter=tuple, validator=_validate_divert
    )


@attrs.frozen
class QuicBlock:
    """UDP to ``dports`` (QUIC: HTTP/3) from ``sources`` is rejected, so that browsers
    fall back to TCP, where a TLS port sees them. Empty ``sources``: from everyone."""

    dports: tuple[int, ...] = attrs.field(converter=tuple, validator=_validate_divert)
    sources: tuple[str, ...] = attrs.field(default=(), converter=tuple)


def _quic_sources(block: QuicBlock, version: int) -> list[str] | None:
    """The block's source networks of one IP version; None: from everyone."""
    if not block.sources:
        return None
    return [s for s in block.sources if ipaddress.ip_network(s).version == version]


def _nft_quic_rules(quic: Sequence[QuicBlock], ipv4_only: bool) -> list[str]:
    rules = []
    for block in quic:
        dports = ", ".join(str(d) for d in block.dports)
        for version, nfproto, addr in ((4, "ipv4", "ip"), (6, "ipv6", "ip6")):
            if version == 6 and ipv4_only:
                continue
            sources = _quic_sources(block, version)
            if sources == []:
                continue
            match = f" {addr} saddr {{ {', '.join(sources)} }}" if sources else ""
            rules.append(f"        meta nfproto {nfproto}{match} udp dport {{ {dports} }} reject")
    return rules


def _check_common(ports: Sequence[DivertPort], mark: int, table: int) -> list[DivertPort]:
    ports = list(ports)
    if not ports:
        raise ValueError("no tproxy ports: nothing to divert")
    for port in ports:
        if not isinstance(port, DivertPort):
            raise TypeError(f"expected DivertPort, got {port!r}")
    seen: dict[int, int] = {}
    for port in ports:
        for dport in port.divert:
            if dport in seen and seen[dport] != port.listen_port:
                raise ValueError(
                    f"destination port {dport} is diverted to both :{seen[dport]} and "
                    f":{port.listen_port}; only the first rule would ever match"
                )
            seen[dport] = port.listen_port
    if isinstance(mark, bool) or not isinstance(mark, int) or not 1 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark must be 1-0xffffffff, got {mark!r}")
    if (
        isinstance(table, bool)
        or not isinstance(table, int)
        or not 1 <= table <= 0xFFFFFFFF
        or table in _RESERVED_TABLES
    ):
        raise ValueError(
            f"table must be a routing table number 1-4294967295 other than "
            f"253 (default), 254 (main) and 255 (local), got {table!r}"
        )
    return ports


def _families(ipv4_only: bool) -> list[tuple[str, str]]:
    """(ip command flag, name) for each address family to set up."""
    families = [("-4", "IPv4")]
    if not ipv4_only:
        families.append(("-6", "IPv6"))
    return families


def _ports_summary(ports: Iterable[DivertPort]) -> str:
    return "; ".join(f"tcp dport {','.join(map(str, p.divert))} -> :{p.listen_port}" for p in ports)


def _header(kind: str, ports: Sequence[DivertPort], ipv4_only: bool) -> list[str]:
    return [
        "#!/bin/sh",
        f"# tproxy-twist: {kind} set-up for tproxy ports. Run as root with `sh -e`;",
        "# running it again leaves the same state.",
        f"# Diverted: {_ports_summary(ports)}"
        + (" (IPv4 only)" if ipv4_only else " (IPv4 and IPv6)"),
        "#",
        "# Only forwarded traffic (PREROUTING) is diverted. The proxy's own outbound",
        "# connections, even those spoofing the client's address, are generated",
        "# locally (OUTPUT, not PREROUTING), so they are never diverted back to it.",
        "# Connections to this router's own addresses (its web UI on port 80, say)",
        "# are not diverted either: they are delivered as usual.",
        "set -e",
        "",
    ]


def _policy_routing(mark: int, table: int, ipv4_only: bool) -> list[str]:
    lines = [
        f"# Policy routing: packets marked {mark:#x} are delivered locally (table {table}",
        "# routes every address to lo), so the diverted flows reach the proxy's",
        "# transparent sockets although their destination is not one of ours.",
        "# lo is up on every real host; a fresh network namespace starts with it down.",
        "ip link set lo up",
    ]
    for flag, _name in _families(ipv4_only):
        default = "0.0.0.0/0" if flag == "-4" else "::/0"
        lines += [
            f'if [ -z "$(ip {flag} rule show fwmark {mark:#x} lookup {table})" ]; then',
            f"    ip {flag} rule add fwmark {mark:#x} lookup {table}",
            "fi",
            f"ip {flag} route replace local {default} dev lo table {table}",
        ]
    lines.append("")
    return lines


def nftables_ruleset(
    ports: Sequence[DivertPort],
    *,
    ipv4_only: bool = False,
    mark: int = DEFAULT_MARK,
    quic: Sequence[QuicBlock] = (),
) -> str:
    """Return the nftables ruleset (``nft -f`` input) of :func:`render_nftables`.

    It creates the table ``inet tproxy_twist`` empty if missing, deletes it and
    defines it again, so loading it any number of times leaves one copy.
    """
    ports = _check_common(ports, mark, DEFAULT_TABLE)
    rules = [
        "        # Packets of flows that already belong to one of our transparent sockets:",
        "        # diverted connections after the first packet, and the origin's replies",
        "        # to the proxy's upstream connections that spoof the client's address.",
        f"        meta l4proto tcp socket transparent 1 meta mark set {mark:#x} accept",
        "        # Connections to this router's own addresses are not intercepted.",
        "        fib daddr type local accept",
    ]
    for port in ports:
        dports = ", ".join(str(d) for d in port.divert)
        rules.append(
            f"        # New flows to tcp port(s) {dports}: hand them to :{port.listen_port}."
        )
        rules.append(
            f"        meta nfproto ipv4 tcp dport {{ {dports} }} "
            f"tproxy ip to :{port.listen_port} meta mark set {mark:#x} accept"
        )
        if not ipv4_only:
            rules.append(
                f"        meta nfproto ipv6 tcp dport {{ {dports} }} "
                f"tproxy ip6 to :{port.listen_port} meta mark set {mark:#x} accept"
            )
    lines = [
        f"table inet {NFT_TABLE} {{}}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        "    chain prerouting {",
        "        type filter hook prerouting priority mangle; policy accept;",
        *rules,
        "    }",
    ]
    quic_rules = _nft_quic_rules(quic, ipv4_only)
    if quic_rules:
        lines += [
            "    chain forward {",
            "        type filter hook forward priority filter; policy accept;",
            "        # QUIC (HTTP/3, UDP) would pass the TLS port by: reject it, so that",
            "        # browsers fall back to TCP at once.",
            *quic_rules,
            "    }",
        ]
    lines += ["}", ""]
    return "\n".join(lines)


def render_nftables(
    ports: Sequence[DivertPort],
    *,
    ipv4_only: bool = False,
    mark: int = DEFAULT_MARK,
    table: int = DEFAULT_TABLE,
    quic: Sequence[QuicBlock] = (),
) -> str:
    """Return an ``sh`` script that sets up nftables TPROXY and policy routing.

    It owns exactly one nftables table, ``inet tproxy_twist``, which it
    replaces atomically (one ``nft -f`` transaction) on every run.
    """
    ports = _check_common(ports, mark, table)
    lines = _header("nftables", ports, ipv4_only)
    lines += [
        f"# One table, {NFT_TABLE}, replaced as a whole in one transaction: create it",
        "# empty if missing, delete it, define it again.",
        "# If nothing listens on a tproxy port, `tproxy` finds no socket, the rest of",
        "# the rule is skipped and the packet is routed on unproxied (fail-open).",
        "nft -f - <<'EOF'",
        *nftables_ruleset(ports, ipv4_only=ipv4_only, mark=mark, quic=quic).splitlines(),
        "EOF",
        "",
    ]
    lines += _policy_routing(mark, table, ipv4_only)
    return "\n".join(lines)


def render_iptables(
    ports: Sequence[DivertPort],
    *,
    ipv4_only: bool = False,
    mark: int = DEFAULT_MARK,
    table: int = DEFAULT_TABLE,
    quic: Sequence[QuicBlock] = (),
) -> str:
    """Return an ``sh`` script that sets up the Squid wiki's iptables TPROXY recipe.

    Both chains it owns in the mangle table, ``DIVERT`` (the Squid recipe's) and
    ``TPROXY_TWIST`` (the diverting rules), are flushed and refilled on every
    run; the one jump from PREROUTING is checked with ``-C`` before appending.
    """
    ports = _check_common(ports, mark, table)
    lines = _header("iptables", ports, ipv4_only)
    lines += [
        "# If nothing listens on a tproxy port, the TPROXY target finds no socket and",
        "# DROPS the packet (fail-closed): unlike nftables, nothing is routed on.",
        "",
    ]
    for _flag, name in _families(ipv4_only):
        cmd = "iptables" if name == "IPv4" else "ip6tables"
        lines += [
            f"# {name}: the DIVERT chain marks a packet for local delivery and accepts it.",
            f"{cmd} -t mangle -N DIVERT 2>/dev/null || true",
            f"{cmd} -t mangle -F DIVERT",
            f"{cmd} -t mangle -A DIVERT -j MARK --set-mark {mark:#x}",
            f"{cmd} -t mangle -A DIVERT -j ACCEPT",
            f"# {name}: our PREROUTING rules live in {IPT_CHAIN}, flushed and refilled, so",
            "# a changed port list leaves no stale rule behind.",
            f"{cmd} -t mangle -N {IPT_CHAIN} 2>/dev/null || true",
            f"{cmd} -t mangle -F {IPT_CHAIN}",
            "# Packets of flows that already belong to one of our transparent sockets",
            "# (diverted connections, and the origin's replies to the proxy's spoofed",
            "# upstream connections) go to DIVERT.",
            f"{cmd} -t mangle -A {IPT_CHAIN} -p tcp -m socket --transparent -j DIVERT",
            "# Connections to this router's own addresses are not intercepted.",
            f"{cmd} -t mangle -A {IPT_CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        ]
        for port in ports:
            for dport in port.divert:
                lines += [
                    f"# New flows to tcp port {dport}: hand them to :{port.listen_port}.",
                    f"{cmd} -t mangle -A {IPT_CHAIN} -p tcp --dport {dport} -j TPROXY "
                    f"--tproxy-mark {mark:#x}/{mark:#x} --on-port {port.listen_port}",
                ]
        lines += [
            f"# {name}: PREROUTING jumps to {IPT_CHAIN} once (checked before appending).",
            f"{cmd} -t mangle -C PREROUTING -j {IPT_CHAIN} 2>/dev/null ||",
            f"    {cmd} -t mangle -A PREROUTING -j {IPT_CHAIN}",
            "",
        ]
        if quic:
            lines += _iptables_quic(cmd, 4 if name == "IPv4" else 6, quic)
    lines += _policy_routing(mark, table, ipv4_only)
    return "\n".join(lines)


def _iptables_quic(cmd: str, version: int, quic: Sequence[QuicBlock]) -> list[str]:
    lines = [
        "# QUIC (HTTP/3, UDP) would pass the TLS port by: reject it in the filter table's",
        f"# FORWARD chain (via {IPT_QUIC_CHAIN}), so that browsers fall back to TCP at once.",
        f"{cmd} -t filter -N {IPT_QUIC_CHAIN} 2>/dev/null || true",
        f"{cmd} -t filter -F {IPT_QUIC_CHAIN}",
    ]
    for block in quic:
        sources = _quic_sources(block, version)
        if sources == []:
            continue
        for dport in block.dports:
            for source in sources or [None]:
                match = f" -s {source}" if source else ""
                lines.append(
                    f"{cmd} -t filter -A {IPT_QUIC_CHAIN}{match} -p udp --dport {dport} -j REJECT"
                )
    lines += [
        f"{cmd} -t filter -C FORWARD -j {IPT_QUIC_CHAIN} 2>/dev/null ||",
        f"    {cmd} -t filter -I FORWARD -j {IPT_QUIC_CHAIN}",
        "",
    ]
    return lines


def render_kernel_settings(*, ipv4_only: bool = False) -> str:
    """Return ``sh`` lines for the kernel settings a TPROXY router needs.

    Idempotent, and as gentle as possible: only a strict ``rp_filter`` (1) is
    changed, to loose (2). ``etc/sysctl.d/90-tproxy-twist.conf`` makes the same
    settings survive a reboot.
    """
    lines = [
        "# Kernel settings (etc/sysctl.d/90-tproxy-twist.conf keeps them across reboots).",
        "# Forwarding: the router must route the clients' traffic at all.",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
    ]
    if not ipv4_only:
        lines.append("echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
    lines += [
        "# Strict reverse-path filtering (1) can drop diverted packets; loose (2) does",
        "# not. The kernel applies the larger of `all` and the interface's own value,",
        "# so every strict one becomes loose; 0 (off) is left alone.",
        "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do",
        '    if [ "$(cat "$f")" = 1 ]; then echo 2 > "$f"; fi',
        "done",
        "# Closing a SO_REUSEPORT listener (reload) hands its queued connections to the",
        "# other workers instead of resetting them (Linux 5.14+).",
        "if [ -e /proc/sys/net/ipv4/tcp_migrate_req ]; then",
        "    echo 1 > /proc/sys/net/ipv4/tcp_migrate_req",
        "fi",
        "",
    ]
    return "\n".join(lines)


def divert_ports(config: Config) -> list[DivertPort]:
    """One :class:`DivertPort` per tproxy port of ``config``, in config order.

    Empty when the configuration has no tproxy port.
    """
    return [
        DivertPort(port.listen.port, port.divert) for port in config.ports if port.mode == "tproxy"
    ]


def quic_blocks(config: Config, *, force: bool = False) -> list[QuicBlock]:
    """The QUIC rejections for ``config``: one per tproxy TLS port with ``block_quic``
    (every tproxy TLS port with ``force``, the ``--block-quic`` flag), from the port's
    ``allow`` networks (everyone when it allows everyone)."""
    return [
        QuicBlock(port.divert, () if port.allows_everyone else tuple(str(n) for n in port.allow))
        for port in config.ports
        if port.mode == "tproxy" and port.tls is not None and (port.tls.block_quic or force)
    ]


def serves_ipv6(config: Config) -> bool:
    """Whether any tproxy port can receive IPv6 connections (``[::]`` serves both families)."""
    return any(
        port.listen.family == socket.AF_INET6 for port in config.ports if port.mode == "tproxy"
    )


def render_for_config(
    config: Config,
    *,
    iptables: bool = False,
    ipv4_only: bool = False,
    kernel_settings: bool = True,
    block_quic: bool = False,
) -> str:
    """The complete set-up script for ``config``'s tproxy ports: what ``tproxy-twist rules`` prints.

    IPv6 is left alone when ``ipv4_only`` is set or no tproxy port listens on
    IPv6. QUIC is rejected for the TLS ports that set ``block_quic`` (all of them
    with ``block_quic``, the ``--block-quic`` flag). Raises :class:`ValueError` with a
    reason when there is nothing to divert.
    """
    ports = divert_ports(config)
    if not ports:
        raise ValueError(f'{config.path}: no port has mode = "tproxy": nothing to divert')
    ipv4_only = ipv4_only or not serves_ipv6(config)
    render = render_iptables if iptables else render_nftables
    script = render(ports, ipv4_only=ipv4_only, quic=quic_blocks(config, force=block_quic))
    if kernel_settings:
        script += "\n" + render_kernel_settings(ipv4_only=ipv4_only)
    return script
