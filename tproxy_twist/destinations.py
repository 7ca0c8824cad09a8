"""
Where a client may make the proxy connect: pure decisions, no I/O.

Two layers, asked in this order, the first that matches decides:

  1. L{builtin_refusal}: on forward ports (plain requests and CONNECT), the
     destinations no client should reach through a proxy: this router itself
     (loopback, the unspecified addresses, every address of the host) and
     link-local networks (169.254.0.0/16 with the cloud metadata address,
     fe80::/10), in their IPv4-mapped forms too.  Squid's
     C{http_access deny to_localhost}.  These cannot be lifted.
  2. A port's L{DestinationPolicy}: its C{deny_destinations} rules, then its
     C{allow_destinations} rules, in the order written; the first rule that
     matches decides.  When no rule matches, the destination is allowed if
     the port has no C{allow_destinations}, and refused otherwise (an allow
     list is a whitelist, as Squid's C{acl dst} + C{http_access allow}).

The check always gets an IP address: a name is resolved first and the
address that will really be connected to is checked (see L{resolver}), so a
name cannot point the proxy somewhere its address would be refused.

A rule is a network with an optional set of ports, written
C{"203.0.113.0/24"}, C{"203.0.113.0/24:80,443,8000-8999"},
C{"[2001:db8::/32]:443"} or C{"*:25"} (every address); the syntax is
parsed by L{tproxy_twist.config}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container

import attrs

__all__ = [
    "ALL_PORTS",
    "Decision",
    "DestinationPolicy",
    "DestinationRule",
    "builtin_refusal",
    "check",
    "normalize",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A rule's ports when it names none.
ALL_PORTS: tuple[tuple[int, int], ...] = ((1, 65535),)

# Networks refused on forward ports whatever the configuration says, with the
# reason a client reads in the 403.  The host's own addresses come on top.
_BUILTIN: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("127.0.0.0/8"), "a loopback address of the proxy's host"),
    (ipaddress.ip_network("::1/128"), "a loopback address of the proxy's host"),
    # 0.0.0.0 connects to the host itself on Linux; the rest of 0/8 is "this network".
    (ipaddress.ip_network("0.0.0.0/8"), "an unspecified address (the proxy's host itself)"),
    (ipaddress.ip_network("::/128"), "an unspecified address (the proxy's host itself)"),
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local address (incl. cloud metadata)"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
)


@attrs.frozen
class Decision:
    """
    The verdict on one destination.  C{reason} is one line for the client's
    403 and the log; C{rule} is the configured rule that decided, as
    written, or C{None} for the built-in refusals and the defaults.
    """

    allowed: bool
    reason: str
    rule: str | None = None


ALLOWED = Decision(True, "allowed")


@attrs.frozen
class DestinationRule:
    """One entry of C{allow_destinations} or C{deny_destinations}."""

    allow: bool
    network: IPNetwork | None  # None: every address, both families ("*")
    ports: tuple[tuple[int, int], ...] = ALL_PORTS  # inclusive ranges
    text: str = ""  # as written in the configuration, for messages

    def matches(self, address: IPAddress, port: int) -> bool:
        if self.network is not None:
            if address.version != self.network.version or address not in self.network:
                return False
        return any(low <= port <= high for low, high in self.ports)


@attrs.frozen
class DestinationPolicy:
    """A port's destination rules: deny rules first, then allow rules, in order."""

    deny: tuple[DestinationRule, ...] = ()
    allow: tuple[DestinationRule, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.deny or self.allow)

    def decide(self, address: IPAddress, port: int) -> Decision:
        address = normalize(address)
        for rule in self.deny:
            if rule.matches(address, port):
                why = f"{_where(address, port)} is denied by deny_destinations {rule.text!r}"
                return Decision(False, why, rule.text)
        for rule in self.allow:
            if rule.matches(address, port):
                why = f"{_where(address, port)} is allowed by allow_destinations {rule.text!r}"
                return Decision(True, why, rule.text)
        if self.allow:
            why = f"{_where(address, port)} is not in this port's allow_destinations"
            return Decision(False, why)
        return ALLOWED


def _where(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def normalize(address: IPAddress | str) -> IPAddress:
    """An address as the kernel would connect to it: IPv4-mapped IPv6 becomes IPv4."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])  # drop an fe80::1%eth0 zone
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def builtin_refusal(address: IPAddress | str, own: Container[str]) -> Decision | None:
    """
    Why a forward port refuses C{address} whatever its rules say, or C{None}.

    @param own: this host's addresses as strings (for instance
        L{tproxy_twist.sockets.LocalAddresses}); an address is looked up in
        its canonical text form, IPv4-mapped addresses as IPv4.
    """
    address = normalize(address)
    for network, why in _BUILTIN:
        if address.version == network.version and address in network:
            return Decision(False, f"{address} is {why}")
    if str(address) in own:
        return Decision(False, f"{address} is an address of the proxy's host")
    return None


def check(
    address: IPAddress | str,
    port: int,
    policy: DestinationPolicy,
    *,
    own: Container[str],
    builtin: bool,
) -> Decision:
    """
    The whole decision for connecting to C{(address, port)}: the built-in
    refusals first (when C{builtin}: forward ports), then the port's rules.
    """
    address = normalize(address)
    if builtin:
        refused = builtin_refusal(address, own)
        if refused is not None:
            return refused
    return policy.decide(address, port)
