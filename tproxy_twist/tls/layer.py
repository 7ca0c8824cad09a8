"""
The TLS layer of a C{protocol = "tls"} port: Twisted protocols around the
sans-IO L{ClientHelloReader} and the pure rules of L{decide}.

A connection goes through these states::

    hello ──(ClientHello read, decided)──┬─ deny: alert access_denied (49), close
      │                                  ├─ splice: connecting ─► relaying ─► closed
      │                                  └─ bump: connecting (origin verified?)
      │                                       ├─ no: splice (a fresh connection), or terminate
      │                                       └─ ok: handshaking (our leaf) ─► bumped (HTTP)
      ├─(not TLS)── on_not_tls: close, or tunnel: connecting ─► relaying
      └─(timeout, too large, malformed)── close (an alert where TLS was spoken)

Splicing connects to the original destination address (the SNI is only
advisory: it is never looked up), from the client's own address on spoofing
ports, writes the bytes read so far, then relays bytes both ways with
backpressure, half-close (an EOF from one side becomes a write shutdown
towards the other) and the idle timeout.  Between two plain TCP sockets
a L{SplicePump} relays (both sockets out of Twisted's reading; the bytes
copied through its buffer, or with C{[[port]] stream_relay = "splice"}
moved by splice(2) through a pipe), and the upstream side is a raw socket
(L{tproxy_twist.sockets.open_upstream}) that the pump itself connects, sends
the hello to and relays: no Twisted connector, client transport or protocol
per splice.  Otherwise (test fakes, C{zerocopy=False}, a scoped IPv6
destination) the upstream is connected through C{connect} and each side's
transport is the other's producer.  Either way the connect timeout is the
connection's deadline (the factory's sweep), and a failed connect has the
same metric, log line, access-log entry and answer (a reset).  One access
log entry and one action per connection.

Bumping (L{tproxy_twist.tls.bump}) verifies the origin first, then starts
TLS on the client's connection with a leaf for the verified name, replaying
the hello that was read; after the client's handshake this protocol passes
the decrypted stream to an HTTP relay connection (the access log then has
one entry per request, from the HTTP session, instead of one per connection).
A client that offers ALPN without http/1.1 (h2 only), an SNI that is no
host name, and a host whose clients keep refusing our certificate
(C{pinned_splice_after}) are spliced instead.
"""

from __future__ import annotations

from twisted.internet import error as twisted_error
from twisted.internet import task
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..accesslog import AccessEntry
from ..config import PortConfig, Timeouts
from ..destinations import normalize
from ..logthrottle import LogThrottle
from ..sockets import UpstreamConnect, nat_original_destination, open_upstream, unmap, writer_for
from ..zerocopy import CONNECT_FAILED, DONE, SplicePump, can_splice
from .clienthello import ALERT_ACCESS_DENIED, ClientHello, ClientHelloReader, HelloError, alert
from .decide import Decision, decide

log = Logger()

# How often deadlines are looked at (timeouts fire up to this much late) and
# bytes are handed to the metrics.
SWEEP_INTERVAL = 0.25
_LINGER_SECONDS = 2.0
# Reads (and the send buffer a producer may fill before it is paused) while
# splicing: bulk transfers dominate, larger reads halve the system calls.
_SPLICE_READ = 1 << 18
ALERT_DECODE_ERROR = 50
ALERT_HANDSHAKE_FAILURE = 40
# Bytes a client may send (hello included) while its upstream connection is made.
_CONNECTING_BUFFER = 1 << 16

# States of a TLSConnection
HELLO = "hello"
CONNECTING = "connecting"
RELAYING = "relaying"
HANDSHAKING = "handshaking"  # bump: the client's handshake with our leaf
BUMPED = "bumped"  # bump: the decrypted stream goes to the HTTP relay
CLOSING = "closing"
CLOSED = "closed"


def tls_factory(
    port, config, reactor, connect, local_addresses, access_log, budget, *, bump=None
) -> TLSFactory:
    """
    The factory of a C{protocol = "tls"} port, as the worker builds it;
    C{bump}: the worker's L{tproxy_twist.tls.bumpkit.BumpKit} when this port
    may bump.
    """
    from ..metrics import (
        NullPortMetrics,
        NullStreamMetrics,
        NullTLSPortMetrics,
        PortMetrics,
        StreamMetrics,
        TLSPortMetrics,
    )

    metrics_on = config.metrics_listen is not None
    bump_metrics = None
    if bump is not None and port.tls.policy.bumps:
        from ..metrics import BumpMetrics, NullBumpMetrics

        bump_metrics = (BumpMetrics if metrics_on else NullBumpMetrics)(port.name)
    else:
        bump = None
    return TLSFactory(
        port,
        timeouts=config.timeouts,
        connect=connect,
        clock=reactor,
        local_addresses=local_addresses,
        metrics=(PortMetrics if metrics_on else NullPortMetrics)(port.name, port.mode),
        tls_metrics=(TLSPortMetrics if metrics_on else NullTLSPortMetrics)(port.name),
        stream_metrics=(StreamMetrics if metrics_on else NullStreamMetrics)(port.name),
        access_log=access_log,
        budget=budget,
        bump=bump,
        bump_metrics=bump_metrics,
        limits=config.limits,
        reactor=reactor,
        open_upstream=open_upstream,
    )


class TLSFactory(Factory):
    """Builds a L{TLSConnection} for each connection on one TLS port."""

    noisy = False

    def __init__(
        self,
        port: PortConfig,
        *,
        timeouts: Timeouts,
        connect: UpstreamConnect,
        clock: IReactorTime,
        local_addresses,
        metrics,
        tls_metrics,
        access_log=None,
        budget=None,
        bump=None,
        bump_metrics=None,
        limits=None,
        reactor=None,
        zerocopy: bool = True,
        stream_metrics=None,
        open_upstream=None,
    ) -> None:
        assert port.tls is not None, "a TLS factory needs a protocol = 'tls' port"
        self.port = port
        self.tls = port.tls
        self.timeouts = timeouts
        self.connect = connect
        self.clock = clock
        #: the connections' log lines: one per kind per interval under a flood
        self.throttle = LogThrottle(clock)
        #: the reactor a L{SplicePump} registers its sockets with
        self.reactor = reactor if reactor is not None else clock
        #: relay through a L{SplicePump} where both sockets allow it
        self.zerocopy = zerocopy
        #: ... moving the bytes with splice(2) ([[port]] stream_relay = "splice"),
        #: else copying them through the pump's buffer
        self.splice_streams = port.stream_relay == "splice"
        #: C{open_upstream(host, port, source_ip)} (L{tproxy_twist.sockets.open_upstream}):
        #: a splice's upstream as a raw socket that the L{SplicePump} connects and
        #: owns, without Twisted's connector, client and protocol; C{None}: always
        #: through C{connect}
        self.open_upstream = open_upstream
        self.local_addresses = local_addresses
        self.metrics = metrics
        self.tls_metrics = tls_metrics
        self.stream_metrics = stream_metrics
        self.access_log = access_log
        self.budget = budget
        self.connections: set[TLSConnection] = set()
        self._sweeper: task.LoopingCall | None = None
        #: The worker's bump kit (C{None}: this port never bumps) and its metrics.
        self.bump = bump
        self.bump_metrics = bump_metrics
        self.limits = limits
        self._http = None  # the HTTP relay of bumped connections, made when first needed
        # Connections opened, and the change of the active count, since the last
        # flush: in multiprocess mode each prometheus_client update is a locked
        # write to a memory-mapped file (about 5 us), so they go at each sweep.
        self._opened = 0
        self._active_change = 0

    @property
    def http(self):
        """The HTTP relay factory that bumped connections' decrypted streams go to."""
        if self._http is None:
            from .bump import bumped_http_factory

            self._http = bumped_http_factory(self)
        return self._http

    def buildProtocol(self, addr):
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(SWEEP_INTERVAL, now=False)
        return TLSConnection(self)

    def sweep(self) -> None:
        """Time out what has to; hand byte counts of long splices to the metrics."""
        now = self.clock.seconds()
        for connection in list(self.connections):
            try:
                connection.check_deadline(now)
                connection.flush_bytes()
            except Exception:
                log.failure("sweeping a TLS connection failed")
        self.flush_metrics()

    def flush_metrics(self) -> None:
        """Hand what was counted since the last sweep to the metrics."""
        if self._opened:
            self.metrics.connections.inc(self._opened)
            self._opened = 0
        change = self._active_change
        if change:
            self._active_change = 0
            if change > 0:
                self.metrics.active.inc(change)
            else:
                self.metrics.active.dec(-change)
        self.metrics.flush()
        self.tls_metrics.flush()
        if self.stream_metrics is not None:
            self.stream_metrics.flush()

    def drain(self, min_idle: float = 1.0) -> int:
        """
        Reload or stop: spliced connections carry on (until they end, or the
        drain timeout aborts them), as HTTP tunnels do; bumped ones close
        after their current response, as HTTP connections do.  Returns how
        many are still open.
        """
        if self._http is not None:
            self._http.drain(min_idle)
        return len(self.connections)

    def abort_all(self) -> None:
        for connection in list(self.connections):
            connection.abort()

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
        self.flush_metrics()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None


def _stop_connecting(connector) -> None:
    """Call off a connection attempt (an upstream connector), if it still is one."""
    if connector is not None:
        try:
            connector.stopConnecting()
        except twisted_error.NotConnectingError:
            pass  # connected or failed meanwhile: its own events follow


@implementer(IHalfCloseableProtocol)
class SpliceUpstream(Protocol):
    """The connection to the original destination; reports everything to its client."""

    def __init__(self, client: TLSConnection) -> None:
        self.client = client
        self.lost = False
        self.writer = None

    def connectionMade(self) -> None:
        # TCP_NODELAY is set on the socket before connecting (sockets.py).
        self.writer = writer_for(self.transport)
        self.client.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.upstream_data(data)

    def readConnectionLost(self) -> None:
        self.client.upstream_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self.client.upstream_lost(self, reason)


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, client: TLSConnection) -> None:
        self.client = client

    def buildProtocol(self, addr):
        return SpliceUpstream(self.client)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.client.upstream_failed(reason)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class TLSConnection(Protocol):
    """One accepted connection on a TLS port."""

    def __init__(self, factory: TLSFactory) -> None:
        self.factory = factory
        self.port = factory.port
        self._clock = factory.clock
        self.state = HELLO
        self.reader = ClientHelloReader()
        self.hello: ClientHello | None = None
        self.action = "close"  # what the access log and metrics say was done
        self.status = 0  # the access log's status: 200 relayed, 403 denied, 502 no upstream
        self.client_ip = ""
        self.destination: tuple[str, int] | None = None
        self.upstream: SpliceUpstream | None = None
        self._pending = b""  # bytes of a connection that is not TLS, for the tunnel
        # "forbidden", "loop" or "destination": deny whatever the rules say
        self._refusal: str | None = None
        self._refusal_reason = ""
        self._client_eof = False
        self._upstream_eof = False
        self._started = 0.0
        self._connect_started = 0.0
        self._connector = None  # the splice's upstream connector while it connects
        self._last_activity = 0.0
        self._timer = ""
        self._deadline = 0.0
        self._bytes_in = 0
        self._bytes_out = 0
        self._unflushed_in = 0
        self._unflushed_out = 0
        self._writer = None
        self._paused = False  # reading paused: too much arrived while connecting
        # Bump: the name verified and forged for, the verified origin being
        # made or made, and the HTTP relay connection after the handshake.
        self.leaf: str | None = None
        self._origin_attempt = None
        self.origin = None
        self.http = None
        #: a bumped connection's decrypted bytes (its requests'), for its access-log line
        self.decrypted_in = 0
        self.decrypted_out = 0
        self.pump: SplicePump | None = None  # while relaying zero-copy
        self._pumped_in = 0  # the pump's counts already added to the byte counts
        self._pumped_out = 0

    # --- the client side -------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        transport = self.transport  # TCP_NODELAY: inherited from the listener (sockets.py)
        factory.connections.add(self)
        if factory.budget is not None:
            factory.budget.acquire()
        factory._opened += 1  # handed to the metrics at the next sweep
        factory._active_change += 1
        now = self._clock.seconds()
        self._started = self._last_activity = now
        self.client_ip = unmap(transport.getPeer().host)
        if self.port.mode == "intercept":
            try:
                self.destination = nat_original_destination(transport.getHandle())
            except OSError:
                self._refusal = "loop"
        else:
            host = transport.getHost()
            self.destination = (unmap(host.host), host.port)
        if self.destination is not None and self.destination[0] in factory.local_addresses:
            self.factory.throttle.emit(
                log.warn,
                "loop",
                "refusing direct connection from {client} to TLS port {name!r}: the original"
                " destination {dest} is this host's own address (relaying would loop)",
                client=self.client_ip,
                name=self.port.name,
                dest=self.destination[0],
            )
            self._refusal = "loop"
        elif not self.port.allows_everyone and not self.port.allows(self.client_ip):
            self._refusal = "forbidden"
        elif self.destination is not None and not self.port.destinations.empty:
            # allow/deny_destinations, as on HTTP ports: whatever the action (splice,
            # bump, tunnel), no upstream connection to a refused destination.
            decision = self.port.destinations.decide(
                normalize(self.destination[0]), self.destination[1]
            )
            if not decision.allowed:
                self._refusal = "destination"
                self._refusal_reason = decision.reason
        self._arm("hello", factory.tls.client_hello_timeout)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state != BUMPED:
            self._count_in(len(data))
        if state == RELAYING:
            self.upstream.writer.write(data)
        elif state == BUMPED:
            self.http.dataReceived(data)  # decrypted: the HTTP session counts it
        elif state == HELLO:
            try:
                hello = self.reader.feed(data)
            except HelloError as e:
                self._bad_hello(e, data)
                return
            if hello is not None:
                self._decide(hello)
        elif state == CONNECTING:
            # Reading goes on while connecting (pausing and resuming would cost two
            # epoll_ctl calls per connection) up to one socket read ahead.
            if self.hello is not None:
                self.reader.feed(data)
            else:
                self._pending += data
            if self._bytes_in > _CONNECTING_BUFFER and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        # CLOSING, CLOSED: discarded

    def readConnectionLost(self) -> None:
        self._client_eof = True
        if self.state == RELAYING:
            self.upstream.transport.loseWriteConnection()
            if self._upstream_eof:
                self._close_both()
        elif self.state == HELLO:
            self._finish_without_decision()  # the client gave up before its hello was complete
        elif self.state == CLOSING:
            self.transport.loseConnection()
        elif self.state == BUMPED:
            self.http.readConnectionLost()
        # CONNECTING: the write shutdown follows the replay (upstream_connected)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        previous, self.state = self.state, CLOSED
        factory = self.factory
        self._sync_pump()
        factory.connections.discard(self)
        if factory.budget is not None:
            factory.budget.release()
        factory._active_change -= 1
        self._timer = ""
        upstream = self.upstream
        if self.pump is not None:
            self.pump.abort()  # no-op if it ended: then it closed both sides itself
        elif upstream is not None and not upstream.lost:
            if previous == RELAYING and self._client_eof:
                upstream.transport.loseConnection()  # what is buffered for it still goes out
            else:
                upstream.transport.abortConnection()
        if previous == HELLO:
            factory.tls_metrics.action("close")  # the client left before its hello was whole
        elif previous == CONNECTING and self._connector is not None:
            # No connection left behind to an origin that is slow to answer.
            connector, self._connector = self._connector, None
            _stop_connecting(connector)
        elif previous == CONNECTING and self._origin_attempt is not None:
            self._origin_attempt.cancel()
        elif previous == HANDSHAKING:
            self._client_handshake_failed(reason)
        self.flush_bytes()
        if previous == BUMPED:
            # Dropped (it refers back to this connection: a cycle for the cyclic GC).
            http, self.http = self.http, None
            http.connectionLost(reason)  # the HTTP session logs each request...
        self._log_entry()  # ...and the connection gets its own line
        # A splice's upstream protocol refers back to this connection: dropped (after
        # the log line, which names its destination), so that reference counting
        # frees both; its late events find nothing to do (upstream_lost, upstream_eof).
        self.upstream = None

    # --- deciding ---------------------------------------------------------------

    def _decide(self, hello: ClientHello) -> None:
        self.hello = hello
        self._timer = ""
        if self._refusal is not None:
            self.factory.metrics.rejected(self._refusal)
            self.factory.throttle.emit(
                log.info,
                "denied",
                "denying {client} -> {sni}: {why}",
                client=self.client_ip,
                sni=hello.sni,
                why=self._refusal_reason or _REFUSALS[self._refusal],
            )
            self._deny(Decision("deny", "default"))
            return
        decision = decide(self.factory.tls.policy, hello.sni, self.client_ip, self.destination[0])
        getattr(self, _ACTIONS[decision.action])(decision)

    def _deny(self, decision: Decision) -> None:
        tls_metrics = self.factory.tls_metrics
        tls_metrics.action("deny")
        tls_metrics.rejected("no_sni" if decision.because == "no_sni" else "denied")
        self.action = "deny"
        self.status = 403
        self._send_alert_and_close(ALERT_ACCESS_DENIED)

    def _splice(self, decision: Decision | None) -> None:
        self.factory.tls_metrics.action("splice")
        self.action = "splice"
        self._connect()

    def _bump(self, decision: Decision) -> None:
        factory = self.factory
        kit = factory.bump
        hello = self.hello
        why = self._why_not_bump(hello)
        if why is not None:
            self.factory.throttle.emit(
                log.info,
                "splice-instead",
                "splicing {client} -> {sni} instead of bumping: {why}",
                client=self.client_ip,
                sni=hello.sni,
                why=why,
            )
            self._splice(decision)
            return
        from .bump import connect_origin

        self.state = CONNECTING
        source = self.client_ip if self.port.spoof_client_ip else None
        self._connect_started = self._clock.seconds()
        attempt = self._origin_attempt = connect_origin(
            factory.connect,
            kit,
            self.destination,
            self.leaf,
            source,
            self._clock,
            factory.timeouts.connect,
            timers=False,  # this connection's deadline, checked by the sweep
        )
        attempt.result.addCallbacks(self._origin_verdict, self._origin_unreachable)
        if self.state == CONNECTING:  # not failed at once
            self._arm("origin", factory.timeouts.connect)

    def _why_not_bump(self, hello: ClientHello) -> str | None:
        """Why this connection is spliced although the rules say bump, or C{None}."""
        kit = self.factory.bump
        if kit is None:
            return "bumping is not set up in this worker"
        if hello.alpn and "http/1.1" not in hello.alpn:
            return "the client offers ALPN without http/1.1 (" + ",".join(hello.alpn) + ")"
        from .bump import leaf_name

        if hello.sni is None:
            self.leaf = leaf_name(self.destination[0])
        else:
            self.leaf = leaf_name(hello.sni)
            if self.leaf is None:
                return "the SNI is not a host name"
        if kit.pinned.should_splice(self.leaf):
            return "its clients kept refusing our certificate (pinned_splice_after)"
        return None

    def _origin_deadline(self, now: float) -> None:
        # The bump's origin connection has no timers of its own: the connect timeout
        # for the TCP connection, then again for the TLS handshake, as its timers were.
        attempt = self._origin_attempt
        if attempt is None or self.state != CONNECTING:
            self._timer = ""
            return
        origin = attempt.origin
        if origin is None or origin.connected_at is None:
            self._timer = ""
            self._origin_attempt = None
            attempt.cancel()  # its result never fires
            self._origin_unreachable(Failure(twisted_error.TimeoutError()))
            return
        left = origin.connected_at + self.factory.timeouts.connect - now
        if left > 0:
            self._deadline = now + left
            return
        self._timer = ""
        origin.time_out()  # verdict "timeout": spliced or terminated (_origin_verdict)

    def _origin_unreachable(self, reason: Failure) -> None:
        self._origin_attempt = None
        self.factory.tls_metrics.action("bump")
        self.action = "bump"
        self.upstream_failed(reason)

    def _origin_verdict(self, result) -> None:
        origin, verdict = result
        self._origin_attempt = None
        factory = self.factory
        if self.state != CONNECTING:
            origin.transport.abortConnection()  # the client left meanwhile
            return
        factory.bump_metrics.origin_verified(verdict.result)
        if not verdict.ok:
            terminate = factory.bump.on_verify_failure == "terminate"
            self.factory.throttle.emit(
                log.info,
                "origin-unverified",
                "origin {dest} failed verification for {name} ({result}: {detail}):"
                " {what} {client}",
                dest=_address(self.destination),
                name=self.leaf,
                result=verdict.result,
                detail=verdict.detail,
                what="closing" if terminate else "splicing",
                client=self.client_ip,
            )
            if terminate:
                factory.tls_metrics.action("close")
                factory.tls_metrics.rejected("origin_unverified")
                self.action = "terminate"
                self.status = 502
                self._send_alert_and_close(ALERT_HANDSHAKE_FAILURE)
            else:
                # A fresh connection, the hello replayed: the client sees the
                # origin's own certificate and decides for itself.
                self._splice(None)
            return
        factory.metrics.connect_duration.observe(self._clock.seconds() - self._connect_started)
        factory.tls_metrics.action("bump")
        self.action = "bump"
        self.origin = origin
        self.state = HANDSHAKING
        self._arm("handshake", factory.tls.client_hello_timeout)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        # The hello (and whatever followed it) goes to the new TLS layer.
        factory.bump.server.start(self.transport, self.leaf, self.reader.buffered)

    def handshakeCompleted(self) -> None:
        """The client accepted our leaf: its decrypted stream goes to the HTTP relay."""
        if self.state != HANDSHAKING:
            return
        self._timer = ""
        self.state = BUMPED
        self.status = 200
        self.http = self.factory.http.buildBumped(self)
        self.http.makeConnection(self.transport)
        # Decrypted bytes straight to the HTTP relay (what dataReceived does when BUMPED).
        deliver_to = getattr(self.transport, "deliver_to", None)
        if deliver_to is not None:
            deliver_to(self.http.dataReceived)

    def _client_handshake_failed(self, reason: Failure) -> None:
        factory = self.factory
        if self.origin is not None and self.origin.transport is not None:
            self.origin.transport.abortConnection()
        from .bump import client_rejected_certificate

        if not client_rejected_certificate(reason.value):
            return
        factory.bump_metrics.client_rejected_certificate()
        self.factory.throttle.emit(
            log.info,
            "certificate-refused",
            "{client} refused our certificate for {name}: {why}",
            client=self.client_ip,
            name=self.leaf,
            why=reason.getErrorMessage(),
        )
        if factory.bump.pinned.rejected(self.leaf):
            log.info(  # once per host: never a flood
                "splicing {name} from now on: its clients refused our certificate {n} times",
                name=self.leaf,
                n=factory.bump.pinned.threshold,
            )

    def _bad_hello(self, error: HelloError, data: bytes) -> None:
        tls = self.factory.tls
        tls_metrics = self.factory.tls_metrics
        if error.reason == "not_tls" and tls.on_not_tls == "tunnel" and self._refusal is not None:
            # A refused connection is not tunnelled either: closed, as HTTP ports answer 403.
            self.factory.metrics.rejected(self._refusal)
            self.factory.throttle.emit(
                log.info,
                "not-tls-refused",
                "closing {client} (not TLS) instead of tunnelling: {why}",
                client=self.client_ip,
                why=self._refusal_reason or _REFUSALS[self._refusal],
            )
            tls_metrics.action("deny")
            self.action = "deny"
            self.status = 403
            self._timer = ""
            self._close_gently()
            return
        if error.reason == "not_tls" and tls.on_not_tls == "tunnel":
            tls_metrics.action("tunnel")
            self.action = "tunnel"
            self._timer = ""
            self._pending = data
            self._connect()
            return
        tls_metrics.rejected(error.reason)
        tls_metrics.action("close")
        self.factory.throttle.emit(
            log.info,
            "bad-hello",
            "closing {client} on TLS port {name!r}: {error}",
            client=self.client_ip,
            name=self.port.name,
            error=str(error),
        )
        if error.reason == "not_tls":
            self._close_gently()
        else:
            self._send_alert_and_close(ALERT_DECODE_ERROR)

    def _send_alert_and_close(self, description: int) -> None:
        self._write(alert(description))
        self._close_gently()

    def _close_gently(self) -> None:
        """Half-close, discard what the client still sends, abort if it lingers."""
        self.state = CLOSING
        self.transport.loseWriteConnection()
        if self._client_eof:
            self.transport.loseConnection()
        else:
            self._arm("linger", _LINGER_SECONDS)

    def _finish_without_decision(self) -> None:
        self.factory.tls_metrics.action("close")
        self._timer = ""
        self.state = CLOSING
        self.transport.loseConnection()

    # --- the upstream side -----------------------------------------------------------

    def _connect(self) -> None:
        self.state = CONNECTING
        host, port = self.destination
        source = self.client_ip if self.port.spoof_client_ip else None
        self._connect_started = self._clock.seconds()
        factory = self.factory
        if (
            factory.open_upstream is not None
            and factory.zerocopy
            and "%" not in host  # a scoped IPv6 address: Twisted's connector resolves it
            and can_splice(self.transport)
        ):
            self._connect_pumped(host, port, source)
            return
        # The connect timeout is this connection's deadline, checked by the
        # factory's sweep, not a timer of the connector's own: no callLater and
        # cancel (and their heap work) per spliced connection.
        self._connector = self.factory.connect(host, port, _UpstreamFactory(self), None, source)
        if self.state == CONNECTING:  # not failed at once
            self._arm("connect", self.factory.timeouts.connect)

    def _connect_pumped(self, host: str, port: int, source: str | None) -> None:
        """
        The lean splice: a raw upstream socket that the pump connects, replays
        the hello to and relays, the client handed to the pump at once.  The
        same deadlines, metrics, log lines and answers as through Twisted's
        connector (L{upstream_failed}, L{_pump_connected}).
        """
        factory = self.factory
        try:
            sock = factory.open_upstream(host, port, source)
        except twisted_error.ConnectError as e:
            self.upstream_failed(Failure(e))
            return
        replay = self._take_replay()
        self._paused = False  # the pump reads the client from now on
        self.pump = SplicePump(
            self.transport,
            sock,
            reactor=factory.reactor,
            clock=self._clock,
            on_end=self._pump_ended,
            on_connected=self._pump_connected,
            to_b=replay,
            copy=not factory.splice_streams,
        )
        self.pump.start()
        self._arm("connect", factory.timeouts.connect)

    def _pump_connected(self) -> None:
        """The pump's upstream socket is connected; the hello goes out next."""
        self._relaying("splice" if self.factory.splice_streams else "copy")

    def _take_replay(self) -> bytes:
        """What the client sent so far (the hello), for the upstream's first bytes."""
        replay = self.reader.buffered if self.hello is not None else self._pending
        self._pending = b""
        return replay

    def _relaying(self, how: str) -> None:
        """The upstream is connected: bytes flow both ways (C{how}: splice or copy)."""
        factory = self.factory
        factory.metrics.connect_duration.observe(self._clock.seconds() - self._connect_started)
        self.state = RELAYING
        self.status = 200
        self._arm("idle", factory.timeouts.idle)
        if factory.stream_metrics is not None:
            factory.stream_metrics.started(how)

    def upstream_connected(self, upstream: SpliceUpstream) -> None:
        self._connector = None
        if self.state != CONNECTING:
            upstream.transport.abortConnection()  # the client left meanwhile
            return
        self.upstream = upstream
        client, server = self.transport, upstream.transport
        factory = self.factory
        pumped = factory.zerocopy and can_splice(client) and can_splice(server)
        self._relaying("splice" if pumped and factory.splice_streams else "copy")
        replay = self._take_replay()
        if replay:
            upstream.writer.write(replay)
        if pumped:
            self._paused = False
            self.pump = SplicePump(
                client,
                server,
                reactor=factory.reactor,
                clock=self._clock,
                on_end=self._pump_ended,
                copy=not factory.splice_streams,
            )
            self.pump.start()
            return
        client.bufferSize = server.bufferSize = _SPLICE_READ
        # Backpressure both ways: a full send buffer pauses reading on the other side.
        client.registerProducer(server, True)
        server.registerProducer(client, True)
        if self._client_eof:
            server.loseWriteConnection()
        elif self._paused:
            self._paused = False
            client.resumeProducing()

    def _pump_ended(self, reason: str) -> None:
        # Both transports are closing now; their connectionLost calls follow.
        self._sync_pump()
        if reason == DONE:
            self._client_eof = self._upstream_eof = True
        elif reason == CONNECT_FAILED:
            self.upstream_failed(Failure(self.pump.connect_failure))
        self.state = CLOSING

    def upstream_data(self, data: bytes) -> None:
        self._last_activity = self._clock.seconds()
        self._write(data)

    def upstream_eof(self) -> None:
        self._upstream_eof = True
        if self.state == RELAYING:
            self.transport.loseWriteConnection()
            if self._client_eof:
                self._close_both()

    def upstream_lost(self, upstream: SpliceUpstream, reason: Failure) -> None:
        if upstream is not self.upstream or self.state == CLOSED:
            return
        if self.pump is not None:
            self.pump.abort()  # no-op if it ended (it closes the client itself)
            return
        # What is buffered for the client still goes out, then the connection closes.
        self.state = CLOSING
        self.transport.loseConnection()

    def upstream_failed(self, reason: Failure) -> None:
        self._connector = None
        if self.state != CONNECTING:
            return
        from ..http.session import classify_connect_failure

        status, cause, metric = classify_connect_failure(reason.value)
        self.factory.metrics.upstream_error(metric)
        self.status = status
        host, port = self.destination
        self.factory.throttle.emit(
            log.info,
            "connect-failed",
            "cannot {action} {client} to {dest}: {cause}",
            action=self.action,
            client=self.client_ip,
            dest=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            cause=cause,
        )
        # A reset is the nearest a relay can come to "connection refused".
        self.state = CLOSING
        if self.pump is not None:
            self.pump.abort()  # the pump owns the client: it resets it (no-op if it ended)
        else:
            self.transport.abortConnection()

    def _close_both(self) -> None:
        self.transport.loseConnection()
        if self.upstream is not None and not self.upstream.lost:
            self.upstream.transport.loseConnection()

    def abort(self) -> None:
        if self.pump is not None and self.pump.ended is None:
            self.pump.abort()
        else:
            self.transport.abortConnection()

    # --- timers, bytes, the access log -----------------------------------------------

    def _arm(self, kind: str, seconds: float) -> None:
        self._timer = kind
        self._deadline = self._clock.seconds() + seconds

    def check_deadline(self, now: float) -> None:
        kind = self._timer
        if not kind or now < self._deadline:
            return
        if kind == "idle":
            idle = self.factory.timeouts.idle
            last = self._last_activity
            if self.pump is not None:
                last = max(last, self.pump.last_activity)
            left = last + idle - now
            if left > 0:
                self._deadline = now + left
                return
            self.factory.throttle.emit(
                log.info,
                "idle-timeout",
                "closing {client}: no data either way for {s}s",
                client=self.client_ip,
                s=idle,
            )
            self.factory.metrics.rejected("timeout")
            self._timer = ""
            self.abort()
        elif kind == "hello":
            self.factory.throttle.emit(
                log.info,
                "hello-timeout",
                "closing {client} on TLS port {name!r}: no whole ClientHello within {s}s",
                client=self.client_ip,
                name=self.port.name,
                s=self.factory.tls.client_hello_timeout,
            )
            self.factory.tls_metrics.rejected("timeout")
            self.factory.tls_metrics.action("close")
            self._timer = ""
            self.state = CLOSING
            self.transport.loseConnection()
        elif kind == "linger":
            self._timer = ""
            self.abort()
        elif kind == "connect":
            self._timer = ""
            connector = self._connector
            # The metric and the log line a connector's own timeout gave.
            self.upstream_failed(Failure(twisted_error.TimeoutError()))
            _stop_connecting(connector)
        elif kind == "origin":
            self._origin_deadline(now)
        elif kind == "handshake":
            self.factory.throttle.emit(
                log.info,
                "handshake-timeout",
                "closing {client}: no TLS handshake with our certificate for {name} within {s}s",
                client=self.client_ip,
                name=self.leaf,
                s=self.factory.tls.client_hello_timeout,
            )
            self._timer = ""
            self.abort()

    def _count_in(self, n: int) -> None:
        self._bytes_in += n
        self._unflushed_in += n
        self._last_activity = self._clock.seconds()

    def _write(self, data: bytes) -> None:
        self._bytes_out += len(data)
        self._unflushed_out += len(data)
        writer = self._writer
        if writer is None:  # made when first needed: a spliced connection never writes here
            writer = self._writer = writer_for(self.transport)
        writer.write(data)

    def _sync_pump(self) -> None:
        """Add what the pump moved since the last look to the byte counts."""
        pump = self.pump
        if pump is None:
            return
        n_in, n_out = pump.a_to_b - self._pumped_in, pump.b_to_a - self._pumped_out
        if n_in or n_out:
            self._pumped_in += n_in
            self._pumped_out += n_out
            self._bytes_in += n_in
            self._unflushed_in += n_in
            self._bytes_out += n_out
            self._unflushed_out += n_out

    def flush_bytes(self) -> None:
        self._sync_pump()
        if self._unflushed_in or self._unflushed_out:
            self.factory.metrics.transferred(self._unflushed_in, self._unflushed_out)
            self._unflushed_in = self._unflushed_out = 0

    def _log_entry(self) -> None:
        access_log = self.factory.access_log
        if access_log is None:
            return
        now = self._clock.seconds()
        hello = self.hello
        host, port = self.destination or ("-", 0)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bytes_in, bytes_out = self._bytes_in, self._bytes_out
        if self.action == "deny":
            result = "TCP_DENIED"
        elif self.status == 200 and self.action == "bump":
            # Squid's line for a bumped connection; the bytes are its requests' (decrypted).
            result = "NONE"
            bytes_in, bytes_out = self.decrypted_in, self.decrypted_out
        elif self.status == 200:
            result = "TCP_TUNNEL"
        else:
            result = "NONE"
        access_log.log(
            AccessEntry(
                time=now,
                duration=now - self._started,
                client=self.client_ip,
                port=self.port.name,
                mode=self.port.mode,
                method="CONNECT",
                # Squid logs a spliced connection as CONNECT to the SNI and port.
                url=f"{hello.sni}:{port}" if hello is not None and hello.sni else address,
                status=self.status,
                bytes_out=bytes_out,
                bytes_in=bytes_in,
                destination=(
                    address
                    if self.upstream is not None
                    or self.origin is not None
                    or (self.pump is not None and self.status == 200)
                    else None
                ),
                result=result,
                content_type="-",
                sni=hello.sni if hello is not None else None,
                alpn=",".join(hello.alpn) if hello is not None else None,
                tls_version=hello.tls_version if hello is not None else None,
                ech=hello.ech if hello is not None else None,
                action=self.action,
            )
        )


def _address(destination: tuple[str, int]) -> str:
    host, port = destination
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Why a connection is denied before any rule is asked, for the log.
_REFUSALS = {"forbidden": "not allowed on this port", "loop": "a loop"}

#: Decision action -> the L{TLSConnection} method that carries it out.
_ACTIONS = {"splice": "_splice", "deny": "_deny", "bump": "_bump"}
