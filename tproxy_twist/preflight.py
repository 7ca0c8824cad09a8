"""
What a working transparent path needs from the machine, checked one item at
a time: the checks behind C{tproxy-twist check}, and the start-up probe.

Each check returns a L{Check}: a name, whether it passed, what was found,
and (when it did not pass) the exact command that fixes it.  Everything the
checks look at comes through a L{Host}, so tests feed them recorded command
output instead of a real router.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs

from .config import Config
from .rules import DEFAULT_MARK, DEFAULT_TABLE, divert_ports, serves_ipv6
from .sockets import probe_transparent_bind

__all__ = [
    "Check",
    "CommandResult",
    "Diversions",
    "Host",
    "LocalHost",
    "check_capability",
    "check_divert_rules",
    "check_forwarding",
    "check_migrate_req",
    "check_policy_routing",
    "check_quic_blocked",
    "parse_nft_quic_rejects",
    "parse_iptables_quic_rejects",
    "check_rp_filter",
    "check_transparent_bind",
    "families",
    "parse_iptables_save",
    "parse_nft_json",
    "run_checks",
    "startup_problems",
]

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_IP_FLAG = {socket.AF_INET: "-4", socket.AF_INET6: "-6"}

_CAPABILITY_FIX = (
    "run as root, or give the service AmbientCapabilities=CAP_NET_ADMIN (etc/tproxy-twist.service)"
)
_KERNEL_FIX = "modprobe nf_tproxy_ipv4 nf_tproxy_ipv6 nft_tproxy nft_socket"


@attrs.frozen
class Check:
    """The outcome of one check.  C{fix} is set when C{ok} is false."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def lines(self) -> list[str]:
        """How C{tproxy-twist check} prints it: one line, plus the fix when missing."""
        head = f"{'ok' if self.ok else 'missing':<8} {self.name}: {self.detail}"
        if self.ok or not self.fix:
            return [head]
        return [head, f"{'':<8} fix: {self.fix}"]


@attrs.frozen
class CommandResult:
    returncode: int  # 127: the command is not installed
    stdout: str
    stderr: str


class Host(Protocol):
    """The machine being checked."""

    def run(self, argv: Sequence[str]) -> CommandResult: ...

    def read(self, path: str) -> str | None:
        """A file's text, or None when it cannot be read."""

    def listdir(self, path: str) -> list[str]: ...

    def probe_transparent_bind(self, family: int) -> OSError | None: ...


class LocalHost:
    """This machine (this process's network namespace)."""

    def run(self, argv: Sequence[str]) -> CommandResult:
        try:
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=30, errors="replace"
            )
        except FileNotFoundError:
            return CommandResult(127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(124, "", f"{argv[0]}: timed out")
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def read(self, path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def probe_transparent_bind(self, family: int) -> OSError | None:
        return probe_transparent_bind(family)


# --- which families ------------------------------------------------------------


def families(config: Config, *, ipv4_only: bool = False) -> list[int]:
    """The address families the configured tproxy ports receive: IPv4, and IPv6 if any
    listens on it (a C{[::]} listener serves both)."""
    if not divert_ports(config):
        return []
    if ipv4_only or not serves_ipv6(config):
        return [socket.AF_INET]
    return [socket.AF_INET, socket.AF_INET6]


# --- start-up probe --------------------------------------------------------------


def startup_problems(
    config: Config, probe: Callable[[int], OSError | None] = probe_transparent_bind
) -> list[str]:
    """
    Squid's start-up test for every family a tproxy port serves: can a
    transparent socket bind a foreign address?  One message per family that
    cannot, each saying what to do; empty when the proxy can start.
    """
    problems = []
    for family in families(config):
        error = probe(family)
        if error is None:
            continue
        problems.append(
            f"TPROXY support in the system does not work ({FAMILY_NAMES[family]}:"
            f" {error.strerror or error}, errno {error.errno}); {_bind_hint(error)}."
            " Run `tproxy-twist check` for details."
        )
    return problems


def _bind_hint(error: OSError) -> str:
    if error.errno in (errno.EPERM, errno.EACCES):
        return "the process needs CAP_NET_ADMIN (or CAP_NET_RAW): " + _CAPABILITY_FIX
    return (
        "the kernel needs TPROXY support (CONFIG_NETFILTER_XT_TARGET_TPROXY, NFT_TPROXY): "
        + _KERNEL_FIX
    )


# --- the checks ------------------------------------------------------------------


def check_transparent_bind(host: Host, family: int) -> Check:
    name = f"{FAMILY_NAMES[family]} transparent bind"
    error = host.probe_transparent_bind(family)
    if error is None:
        return Check(name, True, "a transparent socket can bind a foreign address")
    fix = _CAPABILITY_FIX if error.errno in (errno.EPERM, errno.EACCES) else _KERNEL_FIX
    return Check(
        name,
        False,
        f"TPROXY support in the system does not work: {error.strerror or error}"
        f" (errno {error.errno})",
        fix,
    )


def check_capability(host: Host) -> Check:
    name = "capability"
    status = host.read("/proc/self/status") or ""
    effective = None
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                effective = int(line.split()[1], 16)
            except (IndexError, ValueError):
                pass
    if effective is None:
        return Check(name, False, "cannot read CapEff from /proc/self/status", _CAPABILITY_FIX)
    held = [
        cap
        for cap, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW))
        if effective >> bit & 1
    ]
    if held:
        return Check(name, True, f"{' and '.join(held)} in the effective set")
    return Check(
        name,
        False,
        "neither CAP_NET_ADMIN nor CAP_NET_RAW in the effective set: IP_TRANSPARENT"
        " sockets cannot be opened (and the checks below cannot read the firewall)",
        _CAPABILITY_FIX,
    )


def check_policy_routing(
    host: Host, family: int, *, mark: int = DEFAULT_MARK, table: int = DEFAULT_TABLE
) -> list[Check]:
    """Two checks: an C{ip rule} sends C{mark} to some table, and that table routes
    every address locally (C{local default dev lo})."""
    fam, flag = FAMILY_NAMES[family], _IP_FLAG[family]
    rule_name = f"{fam} policy rule fwmark {mark:#x}"
    default = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
    rule_fix = f"ip {flag} rule add fwmark {mark:#x} lookup {table}"
    rules = host.run(["ip", "-j", flag, "rule", "show"])
    found_table: str | None = None
    checks = []
    if rules.returncode != 0:
        checks.append(Check(rule_name, False, f"cannot list rules: {_why(rules)}", rule_fix))
    else:
        found_table = _fwmark_table(_json_list(rules.stdout), mark)
        if found_table is None:
            checks.append(
                Check(
                    rule_name,
                    False,
                    f"no `ip {flag} rule` sends packets marked {mark:#x} to a routing table,"
                    " so diverted packets are forwarded instead of delivered to the proxy",
                    rule_fix,
                )
            )
        else:
            checks.append(Check(rule_name, True, f"`fwmark {mark:#x} lookup {found_table}`"))
    lookup = found_table or str(table)
    route_name = f"{fam} local default route in table {lookup}"
    route_fix = f"ip {flag} route replace local {default} dev lo table {lookup}"
    routes = host.run(["ip", "-j", flag, "route", "show", "table", lookup])
    if routes.returncode != 0 and "does not exist" not in routes.stderr:
        checks.append(Check(route_name, False, f"cannot list routes: {_why(routes)}", route_fix))
    elif any(_is_local_default(r) for r in _json_list(routes.stdout)):
        checks.append(Check(route_name, True, "marked packets are delivered to this host"))
    else:
        checks.append(
            Check(
                route_name,
                False,
                f"table {lookup} has no `local` default route: marked packets are not"
                " delivered to this host",
                route_fix,
            )
        )
    return checks


def _fwmark_table(rules: list, mark: int) -> str | None:
    """The table of the first rule that applies to every packet marked C{mark} and is
    consulted before the main table."""
    main_priority = min(
        (r.get("priority", 32766) for r in rules if r.get("table") == "main"), default=32766
    )
    for rule in rules:
        if not isinstance(rule, dict) or "fwmark" not in rule or "not" in rule:
            continue
        if rule.get("src", "all") != "all" or any(k in rule for k in ("dst", "iif", "oif")):
            continue  # narrower than "every marked packet"
        if rule.get("action", "to_tbl") not in ("to_tbl", "lookup") or "table" not in rule:
            continue
        if rule.get("priority", 0) >= main_priority:
            continue
        try:
            value = int(str(rule["fwmark"]), 0)
            mask = int(str(rule.get("fwmask", "0xffffffff")), 0)
        except ValueError:
            continue
        if mark & mask == value:
            return str(rule["table"])
    return None


def _is_local_default(route: object) -> bool:
    return (
        isinstance(route, dict)
        and route.get("type") == "local"
        and route.get("dst") in ("default", "0.0.0.0/0", "::/0")
    )


def check_forwarding(host: Host, family: int) -> Check:
    key = "net.ipv4.ip_forward" if family == socket.AF_INET else "net.ipv6.conf.all.forwarding"
    name = f"{FAMILY_NAMES[family]} forwarding"
    value = _sysctl(host, key)
    if value == "1":
        return Check(name, True, f"{key} = 1")
    return Check(
        name,
        False,
        f"{key} = {value or 'unreadable'}: the router does not route the clients' traffic",
        f"sysctl -w {key}=1",
    )


def check_rp_filter(host: Host) -> Check:
    """Strict reverse-path filtering (1) on any interface can drop diverted packets.
    The kernel applies max(all, interface), so loose (2) in C{all} fixes every one."""
    name = "rp_filter"
    all_value = _sysctl(host, "net.ipv4.conf.all.rp_filter")
    strict = []
    for interface in host.listdir("/proc/sys/net/ipv4/conf"):
        if interface in ("all", "default"):
            continue
        own = _sysctl(host, f"net.ipv4.conf.{interface}.rp_filter")
        values = [int(v) for v in (all_value, own) if v and v.isdigit()]
        if values and max(values) == 1:
            strict.append(interface)
    if all_value == "1" and not strict:
        strict.append("all")
    if not strict:
        return Check(name, True, f"no interface filters strictly (all = {all_value or '?'})")
    return Check(
        name,
        False,
        f"strict reverse-path filtering on {', '.join(strict)} can drop diverted packets",
        "sysctl -w net.ipv4.conf.all.rp_filter=2",
    )


def check_migrate_req(host: Host) -> Check:
    name = "tcp_migrate_req"
    value = _sysctl(host, "net.ipv4.tcp_migrate_req")
    if value == "1":
        return Check(name, True, "net.ipv4.tcp_migrate_req = 1")
    if value is None:
        return Check(
            name,
            False,
            "this kernel has no net.ipv4.tcp_migrate_req (Linux < 5.14): a reload resets"
            " connections still queued on an old worker's listener",
            "upgrade to Linux 5.14 or later",
        )
    return Check(
        name,
        False,
        f"net.ipv4.tcp_migrate_req = {value}: a reload resets connections still queued on"
        " an old worker's listener",
        "sysctl -w net.ipv4.tcp_migrate_req=1",
    )


def _sysctl(host: Host, key: str) -> str | None:
    text = host.read("/proc/sys/" + key.replace(".", "/"))
    return text.strip() if text is not None else None


# --- the diverting rules ---------------------------------------------------------

PortRanges = tuple[tuple[int, int], ...] | None  # None: every port


@attrs.frozen
class DivertRule:
    """A rule that hands new TCP flows to a local port (nftables C{tproxy}, iptables C{TPROXY})."""

    family: int
    to_port: int
    dports: PortRanges
    mark: int | None  # None: the rule sets no mark (or one we cannot read)

    def covers(self, dport: int) -> bool:
        return self.dports is None or any(lo <= dport <= hi for lo, hi in self.dports)


@attrs.frozen
class SocketRule:
    """A rule that marks packets of flows belonging to a transparent socket."""

    family: int
    mark: int | None


@attrs.define
class Diversions:
    """What a firewall's ruleset diverts, as far as the checks need to know."""

    divert: list[DivertRule] = attrs.Factory(list)
    socket: list[SocketRule] = attrs.Factory(list)
    source: str = ""  # "nftables" or "iptables"

    def extend(self, other: Diversions) -> None:
        self.divert += other.divert
        self.socket += other.socket


def parse_nft_json(text: str) -> Diversions:
    """Read C{nft -j list ruleset}.  Rules nftables shows as C{xt} (iptables-nft) are
    not readable here; L{parse_iptables_save} covers those."""
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return Diversions(source="nftables")
    named_sets: dict[tuple[str, str, str], list] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        if "set" in item and isinstance(item["set"], dict):
            s = item["set"]
            named_sets[(s.get("family"), s.get("table"), s.get("name"))] = s.get("elem", [])
    found = Diversions(source="nftables")
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        _read_nft_rule(rule, rule.get("family"), named_sets, found)
    return found


_NFT_FAMILIES = {
    "ip": {socket.AF_INET},
    "ip6": {socket.AF_INET6},
    "inet": {socket.AF_INET, socket.AF_INET6},
}


def _read_nft_rule(rule: dict, table_family: str, named_sets: dict, found: Diversions) -> None:
    fams = set(_NFT_FAMILIES.get(table_family, set()))
    if not fams:
        return
    dports: PortRanges = None
    tproxy: dict | None = None
    mark: int | None = None
    transparent_socket = False
    for expr in rule.get("expr", []):
        if not isinstance(expr, dict):
            continue
        if "match" in expr:
            match = expr["match"]
            left, right, op = match.get("left"), match.get("right"), match.get("op", "==")
            if not isinstance(left, dict):
                continue
            if op not in ("==", "in"):
                if _is_dport(left) or "socket" in left or "meta" in left:
                    return  # a negated selector: too clever to vouch for
                continue
            meta = left.get("meta", {}).get("key") if isinstance(left.get("meta"), dict) else None
            if meta == "nfproto":
                fams &= {
                    {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(v) for v in _values(right)
                }
            elif meta == "l4proto" and "tcp" not in _values(right) and 6 not in _values(right):
                return
            elif _is_dport(left):
                if left["payload"].get("protocol") not in ("tcp", "th"):
                    return
                dports = _port_ranges(right, rule, named_sets)
                if dports is None:
                    return  # unreadable: do not claim it covers anything
            elif isinstance(left.get("socket"), dict):
                if left["socket"].get("key") == "transparent" and right == 1:
                    transparent_socket = True
        elif "tproxy" in expr and isinstance(expr["tproxy"], dict):
            tproxy = expr["tproxy"]
        elif "mangle" in expr and isinstance(expr["mangle"], dict):
            key = expr["mangle"].get("key", {})
            if isinstance(key, dict) and key.get("meta", {}).get("key") == "mark":
                value = expr["mangle"].get("value")
                mark = value if isinstance(value, int) else None
    if tproxy is not None and isinstance(tproxy.get("port"), int):
        tproxy_family = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}.get(tproxy.get("family"))
        if tproxy_family is not None:
            fams &= {tproxy_family}
        for fam in sorted(fams):
            found.divert.append(DivertRule(fam, tproxy["port"], dports, mark))
    elif transparent_socket and mark is not None:
        for fam in sorted(fams):
            found.socket.append(SocketRule(fam, mark))


def _is_dport(left: dict) -> bool:
    payload = left.get("payload")
    return isinstance(payload, dict) and payload.get("field") == "dport"


def _values(right: object) -> list:
    if isinstance(right, dict) and "set" in right:
        return list(right["set"])
    return [right]


def _port_ranges(right: object, rule: dict, named_sets: dict) -> PortRanges | None:
    if isinstance(right, str) and right.startswith("@"):
        elems = named_sets.get((rule.get("family"), rule.get("table"), right[1:]))
        if elems is None:
            return None
        right = {"set": elems}
    ranges = []
    for value in _values(right):
        if isinstance(value, dict) and "range" in value:
            lo, hi = value["range"]
        elif isinstance(value, dict) and "elem" in value:
            lo = hi = value["elem"].get("val")
        else:
            lo = hi = value
        lo, hi = _port_number(lo), _port_number(hi)
        if lo is None or hi is None:
            return None
        ranges.append((lo, hi))
    return tuple(ranges)


def _port_number(value: object) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            return socket.getservbyname(value, "tcp")
        except OSError:
            return None
    return None


def parse_iptables_save(text: str, family: int) -> Diversions:
    """Read C{iptables-save} (C{family} AF_INET) or C{ip6tables-save} (AF_INET6) output."""
    found = Diversions(source="iptables")
    table = ""
    rules: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and table == "mangle":
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            rules.append((words[1], words[2:]))
    marks: dict[str, int] = {}  # chains that set a mark, e.g. the Squid recipe's DIVERT
    for chain, words in rules:
        mark = _option(words, "--set-mark") or _option(words, "--set-xmark")
        if _option(words, "-j") == "MARK" and mark:
            marks.setdefault(chain, _mark_value(mark))
    for _chain, words in rules:
        target = _option(words, "-j")
        if target == "TPROXY":
            port = _option(words, "--on-port")
            if port is None or not port.isdigit() or "!" in words:
                continue
            mark = _option(words, "--tproxy-mark")
            found.divert.append(
                DivertRule(
                    family,
                    int(port),
                    _iptables_dports(words),
                    _mark_value(mark) if mark else None,
                )
            )
        elif "socket" in _all_options(words, "-m") and "!" not in words:
            if target == "MARK":
                mark = _option(words, "--set-mark") or _option(words, "--set-xmark")
                value = _mark_value(mark) if mark else None
            else:
                value = marks.get(target or "")
            if value is not None:
                found.socket.append(SocketRule(family, value))
    return found


def _option(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words[:-1]):
        if word == name:
            return words[i + 1]
    return None


def _all_options(words: list[str], name: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == name]


def _mark_value(text: str) -> int | None:
    try:
        return int(text.split("/")[0], 0)
    except ValueError:
        return None


def _iptables_dports(words: list[str]) -> PortRanges:
    spec = _option(words, "--dport") or _option(words, "--destination-port")
    if spec is None:
        spec = _option(words, "--dports") or _option(words, "--destination-ports")
    if spec is None:
        return None
    ranges = []
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        lo_port, hi_port = _port_number(lo or "0"), _port_number(hi or lo or "65535")
        if lo_port is None or hi_port is None:
            return ()
        ranges.append((lo_port, hi_port))
    return tuple(ranges)


def read_diversions(
    host: Host, family_list: Iterable[int]
) -> tuple[Diversions, Diversions, list[str]]:
    """What nftables and iptables divert (two L{Diversions}), and the reasons any of
    them could not be read."""
    nft_found, ipt_found = Diversions(source="nftables"), Diversions(source="iptables")
    problems = []
    installed = False
    nft = host.run(["nft", "-j", "list", "ruleset"])
    if nft.returncode == 0:
        nft_found = parse_nft_json(nft.stdout)
        installed = True
    elif nft.returncode != 127:
        installed = True
        problems.append(f"`nft -j list ruleset` failed: {_why(nft)}")
    for family in family_list:
        command = "iptables-save" if family == socket.AF_INET else "ip6tables-save"
        saved = host.run([command, "-t", "mangle"])
        if saved.returncode == 0:
            ipt_found.extend(parse_iptables_save(saved.stdout, family))
            installed = True
        elif saved.returncode != 127:
            installed = True
            problems.append(f"`{command}` failed: {_why(saved)}")
    if not installed:
        problems.append("neither nft nor iptables-save is installed (apt install nftables)")
    return nft_found, ipt_found, problems


def check_divert_rules(
    host: Host,
    config: Config,
    family_list: Sequence[int],
    *,
    fix: str | Callable[[bool], str],
    mark: int = DEFAULT_MARK,
) -> list[Check]:
    """For each family: a C{socket} rule, and for each tproxy port a rule diverting
    all its C{divert} ports to it, each setting C{mark}.

    C{fix} is the command that sets the rules up, or a function of "the
    iptables flavour is in use" returning it.
    """
    nft_found, ipt_found, problems = read_diversions(host, family_list)
    uses_iptables = bool(ipt_found.divert or ipt_found.socket) and not (
        nft_found.divert or nft_found.socket
    )
    fix_command = fix(uses_iptables) if callable(fix) else fix
    unreadable = "; ".join(problems)

    def where(found_in: list[str]) -> str:
        return " and ".join(found_in)

    checks = []
    for family in family_list:
        fam = FAMILY_NAMES[family]
        name = f"{fam} socket rule"
        found_in = [
            d.source
            for d in (nft_found, ipt_found)
            if any(s.family == family and s.mark == mark for s in d.socket)
        ]
        if found_in:
            checks.append(
                Check(
                    name,
                    True,
                    f"packets of transparent sockets' flows are marked {mark:#x}"
                    f" ({where(found_in)})",
                )
            )
        else:
            checks.append(
                Check(
                    name,
                    False,
                    f"no rule marks ({mark:#x}) packets of flows that belong to a transparent"
                    " socket (nftables `socket transparent 1`, iptables `-m socket`): replies"
                    " to the proxy's spoofed connections go to the client instead"
                    + (f"; {unreadable}" if unreadable else ""),
                    fix_command,
                )
            )
        for port in divert_ports(config):
            checks.append(
                _divert_check(port, family, mark, (nft_found, ipt_found), unreadable, fix_command)
            )
    return checks


def _divert_check(
    port, family: int, mark: int, found: Sequence[Diversions], unreadable: str, fix: str
) -> Check:
    fam = FAMILY_NAMES[family]
    dports = ",".join(str(d) for d in port.divert)
    name = f"{fam} TPROXY rule tcp dport {dports} -> :{port.listen_port}"
    to_port = [
        (d.source, r)
        for d in found
        for r in d.divert
        if r.family == family and r.to_port == port.listen_port
    ]
    marked = [(source, r) for source, r in to_port if r.mark == mark]
    missing = [d for d in port.divert if not any(r.covers(d) for _, r in marked)]
    if not missing:
        sources = sorted({source for source, r in marked})
        return Check(name, True, f"diverted with mark {mark:#x} ({' and '.join(sources)})")
    detail = (
        f"no {fam} rule diverts tcp port(s) {','.join(map(str, missing))}"
        f" to :{port.listen_port} with mark {mark:#x}"
    )
    if len(marked) < len(to_port):
        detail += " (a rule diverts there but sets another mark or none)"
    if unreadable:
        detail += f"; {unreadable}"
    return Check(name, False, detail, fix)


# --- QUIC ---------------------------------------------------------------------------

_QUIC_WHY = (
    "browsers speak QUIC (HTTP/3 over UDP) to servers that offer it; UDP passes a TCP"
    " proxy by, so that HTTPS is neither seen, nor checked by the port's TLS rules, nor"
    " counted or logged; rejecting it makes browsers fall back to TCP at once"
)


@attrs.frozen
class QuicReject:
    """A rule that rejects or drops UDP to some ports (forwarded traffic)."""

    family: int
    dports: PortRanges

    def covers(self, dport: int) -> bool:
        return self.dports is None or any(lo <= dport <= hi for lo, hi in self.dports)


def parse_nft_quic_rejects(text: str) -> list[QuicReject]:
    """Rules in prerouting or forward chains of C{nft -j list ruleset} that reject or
    drop UDP by destination port."""
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return []
    hooked = set()
    for item in items:
        chain = item.get("chain") if isinstance(item, dict) else None
        if isinstance(chain, dict) and chain.get("hook") in ("prerouting", "forward"):
            hooked.add((chain.get("family"), chain.get("table"), chain.get("name")))
    found = []
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        if (rule.get("family"), rule.get("table"), rule.get("chain")) not in hooked:
            continue
        fams = set(_NFT_FAMILIES.get(rule.get("family"), set()))
        dports: PortRanges = None
        udp = verdict = False
        for expr in rule.get("expr", []):
            if not isinstance(expr, dict):
                continue
            if "reject" in expr or "drop" in expr:
                verdict = True
            match = expr.get("match")
            if not isinstance(match, dict) or not isinstance(match.get("left"), dict):
                continue
            left, right = match["left"], match.get("right")
            if match.get("op", "==") not in ("==", "in"):
                udp = False
                break  # negated selectors: too clever to vouch for
            payload = left.get("payload")
            if isinstance(payload, dict):
                if payload.get("field") == "dport" and payload.get("protocol") == "udp":
                    udp = True
                    dports = _port_ranges(right, rule, {})
                elif payload.get("field") == "saddr":
                    fams &= {
                        {"ip": socket.AF_INET, "ip6": socket.AF_INET6}.get(payload.get("protocol"))
                    }
            elif isinstance(left.get("meta"), dict) and left["meta"].get("key") == "nfproto":
                fams &= {
                    {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(v) for v in _values(right)
                }
        if udp and verdict and dports is not None:
            found += [QuicReject(fam, dports) for fam in sorted(fams)]
    return found


def parse_iptables_quic_rejects(text: str, family: int) -> list[QuicReject]:
    """C{iptables-save -t filter} rules that reject or drop UDP by destination port."""
    found = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if table != "filter" or not line.startswith("-A ") or "!" in line:
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if _option(words, "-p") == "udp" and _option(words, "-j") in ("REJECT", "DROP"):
            dports = _iptables_dports(words)
            if dports:
                found.append(QuicReject(family, dports))
    return found


def check_quic_blocked(
    host: Host, config: Config, family_list: Sequence[int], *, fix: str
) -> list[Check]:
    """For each tproxy TLS port and family: is UDP to its diverted ports rejected?"""
    tls_ports = [p for p in config.ports if p.mode == "tproxy" and p.tls is not None]
    if not tls_ports:
        return []
    found: list[QuicReject] = []
    nft = host.run(["nft", "-j", "list", "ruleset"])
    if nft.returncode == 0:
        found += parse_nft_quic_rejects(nft.stdout)
    for family in family_list:
        command = "iptables-save" if family == socket.AF_INET else "ip6tables-save"
        saved = host.run([command, "-t", "filter"])
        if saved.returncode == 0:
            found += parse_iptables_quic_rejects(saved.stdout, family)
    checks = []
    for port in tls_ports:
        dports = ",".join(str(d) for d in port.divert)
        for family in family_list:
            fam = FAMILY_NAMES[family]
            name = f"{fam} QUIC blocked for TLS port :{port.listen.port} (udp dport {dports})"
            if not port.tls.block_quic:
                checks.append(
                    Check(
                        name, True, f"not blocked, as configured (block_quic = false): {_QUIC_WHY}"
                    )
                )
                continue
            missing = [
                d for d in port.divert if not any(r.family == family and r.covers(d) for r in found)
            ]
            if not missing:
                checks.append(Check(name, True, "UDP to the diverted ports is rejected"))
            else:
                checks.append(
                    Check(
                        name,
                        False,
                        f"no {fam} rule rejects udp port(s) {','.join(map(str, missing))}"
                        f" from the clients: {_QUIC_WHY}",
                        fix,
                    )
                )
    return checks


def _json_list(text: str) -> list:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _why(result: CommandResult) -> str:
    text = (result.stderr or result.stdout).strip().splitlines()
    return text[0] if text else f"exit status {result.returncode}"


# --- all of them -------------------------------------------------------------------


def run_checks(
    config: Config,
    host: Host | None = None,
    *,
    ipv4_only: bool = False,
    rules_fix: str | None = None,
) -> list[Check]:
    """
    Every check for C{config}'s tproxy ports, in the order an operator fixes
    them.  C{rules_fix} is the command that sets up the firewall rules
    (default: C{tproxy-twist rules --config PATH | sh -e}).  A configuration
    without tproxy ports needs none of this: the list is then empty.
    """
    host = host or LocalHost()
    family_list = families(config, ipv4_only=ipv4_only)
    if not family_list:
        return []
    fix: str | Callable[[bool], str]
    if rules_fix is None:

        def fix(uses_iptables: bool) -> str:
            options = (" --iptables" if uses_iptables else "") + (
                " --ipv4-only" if ipv4_only else ""
            )
            path = shlex.quote(os.path.abspath(config.path))
            return f"tproxy-twist rules --config {path}{options} | sh -e"

    else:
        fix = rules_fix
    checks = [check_capability(host)]
    checks += [check_transparent_bind(host, family) for family in family_list]
    for family in family_list:
        checks += check_policy_routing(host, family)
    checks += check_divert_rules(host, config, family_list, fix=fix)
    checks += check_quic_blocked(
        host, config, family_list, fix=fix(False) if callable(fix) else fix
    )
    checks += [check_forwarding(host, family) for family in family_list]
    checks.append(check_rp_filter(host))
    checks.append(check_migrate_req(host))
    return checks
