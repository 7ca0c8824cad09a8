"""
What to do with a TLS connection, decided from its ClientHello: pure rules,
first match wins.  No I/O; the configuration parses into these classes
(L{tproxy_twist.config}).

The SNI is chosen by the client, so it is advisory: a decision may use it to
refuse a connection, but the connection always goes to the original
destination address, never to a DNS lookup of the SNI.
"""

from __future__ import annotations

import ipaddress

import attrs

__all__ = ["ACTIONS", "Decision", "TLSPolicy", "TLSRule", "decide", "name_matches"]

#: Every action a rule may name.  C{splice}: connect to the original
#: destination from the client's address and relay the bytes unchanged;
#: C{deny}: answer with a TLS alert access_denied (49) and close; C{bump}:
#: verify the origin, then decrypt with a certificate from the proxy's CA
#: and relay the HTTP/1.1 inside (see L{tproxy_twist.tls.bump}).
ACTIONS = ("splice", "deny", "bump")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def name_matches(pattern: str, name: str) -> bool:
    """
    Squid's C{ssl::server_name} matching: C{"example.com"} matches that name
    only; C{".example.com"} matches example.com and every name below it.
    Both are lower case without a trailing dot (the reader and the
    configuration make them so).
    """
    if pattern.startswith("."):
        return name == pattern[1:] or name.endswith(pattern)
    return name == pattern


def _in_any(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in networks)


@attrs.frozen
class TLSRule:
    """One rule: every match given must hold (an empty one matches anything)."""

    action: str
    sni: tuple[str, ...] = ()  # exact names and ".suffix" patterns; never matches no SNI
    clients: tuple[IPNetwork, ...] = ()
    destinations: tuple[IPNetwork, ...] = ()

    def matches(self, sni: str | None, client: str, destination: str) -> bool:
        if self.sni and (sni is None or not any(name_matches(p, sni) for p in self.sni)):
            return False
        if self.clients and not _in_any(client, self.clients):
            return False
        if self.destinations and not _in_any(destination, self.destinations):
            return False
        return True


@attrs.frozen
class TLSPolicy:
    """A port's rules, and the actions when none matches."""

    rules: tuple[TLSRule, ...] = ()
    default: str = "splice"  # no rule matched a hello with an SNI
    no_sni: str = "splice"  # no rule matched a hello without an SNI

    @property
    def bumps(self) -> bool:
        """Whether any rule or default of this policy may bump."""
        return "bump" in (self.default, self.no_sni, *(rule.action for rule in self.rules))


@attrs.frozen
class Decision:
    action: str
    #: Why, for logs and the rejection metric: C{"rule"} (rule C{rule} matched),
    #: C{"default"}, or C{"no_sni"} (no rule matched a hello without SNI).
    because: str
    rule: int | None = None  # index of the matching rule


def decide(policy: TLSPolicy, sni: str | None, client: str, destination: str) -> Decision:
    """The first rule that matches decides; otherwise the port's default for the case."""
    for index, rule in enumerate(policy.rules):
        if rule.matches(sni, client, destination):
            return Decision(rule.action, "rule", index)
    if sni is None:
        return Decision(policy.no_sni, "no_sni")
    return Decision(policy.default, "default")
