"""
The moving parts of a bumped connection that need OpenSSL: the verified
upstream connection, and (L{tproxy_twist.http.relay}) the HTTP relay fed with
the decrypted stream.

Imported only by workers that bump (see the README's memory notes):
L{tproxy_twist.tls.layer} imports it when a connection is to be bumped.

The order for one connection (L{tproxy_twist.tls.layer.TLSConnection}):

  1. L{connect_origin}: a connection to the original destination (from the
     client's address on spoofing ports) with L{OriginTLS} on it, which
     verifies the origin's certificate for the client's SNI (or the
     destination's IP address without SNI);
  2. only after an C{ok} verdict, the client's handshake with a leaf for
     exactly that name (L{BumpServerTLS.start});
  3. once the client's handshake is done, the decrypted stream goes to the
     HTTP relay, whose first upstream connection is that verified one.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from ..sockets import UpstreamConnect
from .bumpkit import BumpKit
from .leaf import leaf_name
from .pinning import client_rejected_certificate
from .verify import OriginTLS, OriginVerdict

__all__ = [
    "OriginAttempt",
    "client_rejected_certificate",
    "connect_origin",
    "leaf_name",
]


class OriginAttempt(ClientFactory):
    """
    One verified upstream connection being made.  C{result} fires with
    C{(origin, verdict)} (an L{OriginTLS} and its L{OriginVerdict}), or
    fails with the reason the TCP connection could not be made.  L{cancel}
    gives up: the connection, made or not, is aborted and C{result} never
    fires.
    """

    noisy = False

    def __init__(self, kit: BumpKit, server_name: str, clock: IReactorTime, timeout: float):
        self._creator = kit.origins.creator(server_name)
        self._clock = clock
        self._timeout = timeout
        self.origin: OriginTLS | None = None
        self.connector = None
        self.result: defer.Deferred[tuple[OriginTLS, OriginVerdict]] = defer.Deferred()
        self._cancelled = False

    def buildProtocol(self, addr) -> OriginTLS:
        origin = self.origin = OriginTLS(self._creator, self._clock, self._timeout)
        origin.verdict.addCallback(self._verdict, origin)
        return origin

    def _verdict(self, verdict: OriginVerdict, origin: OriginTLS) -> None:
        if self._cancelled:
            return
        if not verdict.ok and origin.transport is not None:
            origin.transport.abortConnection()  # nothing more is said to an unverified origin
        self.result.callback((origin, verdict))

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if not self._cancelled:
            self.result.errback(reason)

    def cancel(self) -> None:
        """Give up on this connection (the client went away)."""
        if self._cancelled:
            return
        self._cancelled = True
        origin = self.origin
        if origin is not None and origin.transport is not None:
            origin.transport.abortConnection()
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except error.NotConnectingError:
                pass


def connect_origin(
    connect: UpstreamConnect,
    kit: BumpKit,
    destination: tuple[str, int],
    server_name: str,
    source_ip: str | None,
    clock: IReactorTime,
    timeout: float,
) -> OriginAttempt:
    """
    Connect to C{destination} (from C{source_ip} when given) and verify its
    certificate for C{server_name}; C{timeout} bounds the TCP connection and,
    again, the TLS handshake.  See L{OriginAttempt}.
    """
    attempt = OriginAttempt(kit, server_name, clock, timeout)
    host, port = destination
    attempt.connector = connect(host, port, attempt, timeout, source_ip)
    return attempt
