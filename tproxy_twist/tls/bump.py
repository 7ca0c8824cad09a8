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

from ..config import Limits
from ..destinations import normalize
from ..http.relay import ClientConnection, ProxyFactory, ReadGate, RelaySettings, Upstream
from ..http.session import Link, Session
from ..resolver import DestinationRefused
from ..sockets import TransportWriter, UpstreamConnect
from .bumpkit import BumpKit
from .leaf import leaf_name
from .pinning import client_rejected_certificate
from .verify import OriginTLS, OriginVerdict

__all__ = [
    "BumpedClient",
    "BumpedHTTPFactory",
    "OriginAttempt",
    "OriginNotVerified",
    "bumped_http_factory",
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
    fires.  C{timers=False}: the TCP connection and the handshake have no
    timers of their own; the caller keeps the deadline (see L{connect_origin}).
    """

    noisy = False

    def __init__(
        self,
        kit: BumpKit,
        server_name: str,
        clock: IReactorTime,
        timeout: float,
        destination: tuple[str, int] | None = None,
        *,
        timers: bool = True,
    ):
        self._creator = kit.origins.creator(server_name, destination)
        self._clock = clock
        self._timeout = timeout
        self._timers = timers
        self.origin: OriginTLS | None = None
        self.connector = None
        self.result: defer.Deferred[tuple[OriginTLS, OriginVerdict]] = defer.Deferred()
        self._cancelled = False

    def buildProtocol(self, addr) -> OriginTLS:
        # Connected: the connector (which holds this factory) is not needed any
        # more; dropping it leaves no reference cycle for the cyclic GC to find.
        self.connector = None
        origin = self.origin = OriginTLS(
            self._creator, self._clock, self._timeout, timer=self._timers
        )
        origin.verdict.addCallback(self._verdict, origin)
        return origin

    def _verdict(self, verdict: OriginVerdict, origin: OriginTLS) -> None:
        if self._cancelled:
            return
        if not verdict.ok and origin.transport is not None:
            origin.transport.abortConnection()  # nothing more is said to an unverified origin
        self.result.callback((origin, verdict))

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.connector = None
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
    *,
    timers: bool = True,
) -> OriginAttempt:
    """
    Connect to C{destination} (from C{source_ip} when given) and verify its
    certificate for C{server_name}; C{timeout} bounds the TCP connection and,
    again, the TLS handshake.  See L{OriginAttempt}.

    C{timers=False}: no timer (a C{callLater} and its cancel each) for
    either; the caller checks the deadline itself (the TLS layer's sweep:
    L{tproxy_twist.tls.layer.TLSConnection.check_deadline}) and gives up
    with L{OriginAttempt.cancel}, or L{OriginTLS.time_out} once connected.
    """
    attempt = OriginAttempt(kit, server_name, clock, timeout, destination, timers=timers)
    host, port = destination
    attempt.connector = connect(host, port, attempt, timeout if timers else None, source_ip)
    return attempt


# --- the decrypted stream through the HTTP relay -------------------------------------------


class OriginNotVerified(Exception):
    """A further upstream connection of a bumped client failed verification (502)."""


class BumpedHTTPFactory(ProxyFactory):
    """
    The HTTP relay of one TLS port's bumped connections: the port's metrics
    and access log, no budget of its own (the TLS layer's connection holds
    the slot).  Connections come from L{buildBumped}, not from a listener.
    """

    def __init__(self, tls_factory, **kw) -> None:
        super().__init__(tls_factory.port, **kw)
        self.tls_factory = tls_factory

    def buildBumped(self, tls_connection) -> BumpedClient:
        """The HTTP side of C{tls_connection}, whose client handshake has just completed."""
        if self._sweeper is None:
            self.buildProtocol(None)  # starts the sweeper (the protocol is thrown away)
        return BumpedClient(self, tls_connection)


def bumped_http_factory(tls_factory) -> BumpedHTTPFactory:
    """The L{BumpedHTTPFactory} of a L{tproxy_twist.tls.layer.TLSFactory}."""
    import socket

    settings = RelaySettings(
        timeouts=tls_factory.timeouts,
        limits=tls_factory.limits if tls_factory.limits is not None else Limits(),
        pseudonym=socket.gethostname(),
    )
    return BumpedHTTPFactory(
        tls_factory,
        settings=settings,
        connect=tls_factory.connect,
        clock=tls_factory.clock,
        local_addresses=tls_factory.local_addresses,
        metrics=tls_factory.metrics,
        access_log=tls_factory.access_log,
        budget=None,
    )


class BumpedClient(ClientConnection):
    """
    The HTTP relay connection of a bumped client: what it reads was
    decrypted, what it writes is encrypted (so it writes through the
    transport, never straight to the socket).  Its session knows the name
    the origin was verified for (requests must name it: 421 otherwise under
    C{host_verify_strict}); its records say C{https}.  The first upstream
    connection is the verified one the TLS layer made; a further one (after
    the origin closed) is verified the same way before a request goes on it.

    The TLS layer's connection (C{tls}) counted the connection, holds the
    budget slot and forwards the transport's events here.
    """

    __slots__ = ("tls", "_origin")

    def __init__(self, factory: BumpedHTTPFactory, tls_connection) -> None:
        super().__init__(factory)
        self.tls = tls_connection
        self._origin: OriginTLS | None = tls_connection.origin
        sink = factory.sink

        def finished(record) -> None:
            record.scheme = b"https"
            # The connection's own access-log line sums its requests' (decrypted) bytes.
            tls_connection.decrypted_in += record.bytes_in
            tls_connection.decrypted_out += record.bytes_out
            sink(record)

        self.finished = finished

    def connectionMade(self) -> None:
        transport = self.transport
        self.gate = ReadGate(transport)
        self._writer = TransportWriter(transport)
        factory = self.factory
        factory.connections.add(self)
        tls = self.tls
        self.client_ip = tls.client_ip
        self.session = Session(
            factory.session_config,
            self,
            factory.clock,
            tls.client_ip,
            tls.destination,
            server_name=tls.leaf,
        )

    def connectionLost(self, reason: Failure) -> None:
        self.factory.connections.discard(self)
        origin, self._origin = self._origin, None
        if origin is not None and origin.transport is not None:
            origin.transport.abortConnection()  # verified, never used
        session = self.session
        if session is not None:
            session.client_lost()
            bytes_in, bytes_out = session.unrecorded_bytes()
            if bytes_in or bytes_out:
                self.metrics.transferred(bytes_in, bytes_out)
                self.tls.decrypted_in += bytes_in
                self.tls.decrypted_out += bytes_out
        self._let_go()

    def shutdown_write(self) -> None:
        # TLS has no half-close: close_notify, then the connection closes.
        self._uncork()
        self.transport.loseConnection()

    def connect(self, link: Link, destination: tuple[str, int], source_ip: str | None) -> None:
        origin, self._origin = self._origin, None
        if origin is not None and origin.transport is not None:
            # The connection the TLS layer verified before the client got our leaf.
            origin.attach(Upstream(self, link))
            return
        tls_factory = self.factory.tls_factory
        # Requests go to the original destination whatever their Host says (policy.route),
        # which the TLS layer checked against the port's destination rules before the
        # first connection; every further connection is checked again all the same.
        rules = tls_factory.port.destinations
        if not rules.empty:
            decision = rules.decide(normalize(destination[0]), destination[1])
            if not decision.allowed:
                self.session.upstream_failed(link, DestinationRefused(decision))  # 403 in TLS
                return
        attempt = connect_origin(
            tls_factory.connect,
            tls_factory.bump,
            destination,
            self.tls.leaf,
            source_ip,
            tls_factory.clock,
            tls_factory.timeouts.connect,
        )

        def verified(result) -> None:
            origin, verdict = result
            tls_factory.bump_metrics.origin_verified(verdict.result)
            if verdict.ok:
                origin.attach(Upstream(self, link))  # aborted if the client left meanwhile
            elif self.session is not None:
                self.session.upstream_failed(
                    link,
                    OriginNotVerified(
                        f"the origin's certificate failed verification for {self.tls.leaf}"
                        f" ({verdict.result}: {verdict.detail})"
                    ),
                )

        def unreachable(failure: Failure) -> None:
            if self.session is not None:  # else the client left meanwhile
                self.session.upstream_failed(link, failure.value)

        attempt.result.addCallbacks(verified, unreachable)
