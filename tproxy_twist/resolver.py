"""
Resolve, check, then connect: the step between a forward port's request and
its upstream connection.

A name in a request (C{GET http://name/}, C{CONNECT name:443}) is resolved
here, every address it resolves to is checked against the destination rules
(L{tproxy_twist.destinations}), and the caller connects to one of the
checked IP literals, never to the name.  So the address that is checked is
the address that is connected to: a name cannot pass the check with one
address and be connected with another (DNS rebinding), and a name that
resolves to a refused address (C{localhost}, a name pointing at the router
or at 169.254.169.254) is refused, even if it has other addresses too.

Resolution uses the reactor's name resolver (C{getaddrinfo} in the
reactor's thread pool), so it never blocks the reactor and never waits
behind password checks (L{tproxy_twist.auth.BcryptPool} has its own pool).
"""

from __future__ import annotations

from collections.abc import Container

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IReactorTime, IResolutionReceiver
from zope.interface import implementer

from .destinations import Decision, DestinationPolicy, check, normalize

__all__ = ["DestinationRefused", "DestinationResolver", "Resolved"]


class DestinationRefused(Exception):
    """The destination may not be connected to; C{decision.reason} says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


@attrs.frozen
class Resolved:
    """
    Where to connect: C{addresses} are IP literals that all passed the
    check, in the resolver's order of preference (the first is the one to
    try first; the others are for a caller that falls back).
    """

    host: str  # as the client named it
    port: int
    addresses: tuple[str, ...]


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: defer.Deferred = defer.Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        host = address.host
        if host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # not given up on (timed out) meanwhile
            self.done.callback(self.addresses)


def _literal(host: str) -> str | None:
    """C{host} as an IP literal without brackets and zone, or C{None} for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(normalize(text))
    except ValueError:
        return None


class DestinationResolver:
    """
    One per port.  L{resolve} returns a Deferred that fires with a
    L{Resolved}, or fails with L{DestinationRefused} (answer 403) or
    C{DNSLookupError} (the name does not resolve: answer 502).

    @param builtin: whether the built-in refusals (the router itself,
        link-local) apply: on forward ports.
    @param own: this host's addresses (L{tproxy_twist.sockets.LocalAddresses}).
    @param clock: with C{timeout}: a name that is not resolved within
        C{timeout} seconds fails with C{DNSLookupError} (C{getaddrinfo}
        cannot be interrupted; its late answer is dropped).
    """

    def __init__(
        self,
        name_resolver: IHostnameResolver,
        policy: DestinationPolicy,
        *,
        own: Container[str],
        builtin: bool,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
    ) -> None:
        self._names = name_resolver
        self.policy = policy
        self._own = own
        self._builtin = builtin
        self._clock = clock
        self._timeout = timeout

    @property
    def checks_anything(self) -> bool:
        """Whether L{check_address} can ever refuse (else callers may skip it)."""
        return self._builtin or not self.policy.empty

    def check_address(self, address: str, port: int) -> Decision:
        """The decision for an IP literal (an original destination, a literal in a URL)."""
        return check(address, port, self.policy, own=self._own, builtin=self._builtin)

    def resolve(self, host: str, port: int) -> defer.Deferred:
        literal = _literal(host)
        if literal is not None:
            decision = self.check_address(literal, port)
            if not decision.allowed:
                return defer.fail(DestinationRefused(decision))
            return defer.succeed(Resolved(host, port, (literal,)))
        collector = _Collector()
        self._names.resolveHostName(
            collector,
            host,
            port,
            addressTypes=[IPv4Address, IPv6Address],
            transportSemantics="TCP",
        )
        d = collector.done
        if self._clock is not None and self._timeout is not None:

            def timed_out(result, timeout: float):
                raise DNSLookupError(f"resolving {host} took longer than {timeout:g} s")

            d.addTimeout(self._timeout, self._clock, onTimeoutCancel=timed_out)
        return d.addCallback(self._checked, host, port)

    def _checked(self, addresses: list[str], host: str, port: int) -> Resolved:
        if not addresses:
            raise DNSLookupError(f"cannot resolve {host}")
        checked = []
        for address in addresses:
            literal = str(normalize(address))
            decision = self.check_address(literal, port)
            if not decision.allowed:
                raise DestinationRefused(
                    attrs.evolve(
                        decision, reason=f"{host} resolves to a refused address: {decision.reason}"
                    )
                )
            if literal not in checked:
                checked.append(literal)
        return Resolved(host, port, tuple(checked))
