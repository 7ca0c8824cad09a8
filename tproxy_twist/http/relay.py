"""
The HTTP relay's Twisted side: the client and upstream protocols, the read
gate, the writer and corking.  Everything the relay decides is in the
sans-IO L{session.Session}; this module feeds it transport events and does
what it asks (L{session.SessionIO}).

Once a session becomes a tunnel (CONNECT, or a 101 upgrade) and both
connections are plain TCP, the adapter hands the two sockets to a
L{SplicePump} (zero-copy, splice(2)); the session then hears only of the
client's EOF, of activity (for its idle deadline) and of the end, and the
tunnel's bytes are added to its record when that is finished.

One client connection has at most one upstream connection at a time.  On
tproxy ports it is bound to the client's own address, so it is never shared
with another client.  Requests on one client connection are handled one at
a time, in order: pipelined requests wait in the reader (and in the kernel,
since reading from the client pauses) until the previous response is done.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import task
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..accesslog import AccessLog
from ..config import Limits, PortConfig, Timeouts
from ..logthrottle import LogThrottle
from ..metrics import PortMetrics
from ..resolver import DestinationResolver, Resolved
from ..sockets import UpstreamConnect, nat_original_destination, unmap, writer_for
from ..zerocopy import DONE, SINK_FAILED, SplicePump, SpliceTransfer, can_splice, can_splice_body
from . import headers as H
from . import policy
from .record import ExchangeRecord, RecordSink
from .session import (
    BACKPRESSURE,
    CONNECTING_READS,
    PIPELINE,
    Link,
    Session,
    SessionConfig,
    State,
    classify_connect_failure,
)

_CONNECTING = State.CONNECTING

__all__ = [
    "ClientConnection",
    "ConnectionBudget",
    "ProxyFactory",
    "ReadGate",
    "RelaySettings",
    "classify_connect_failure",
]

log = Logger()

_DEFAULT_READ = 1 << 16  # Twisted's FileDescriptor.bufferSize
_LARGE_READ = 1 << 18
# How often deadlines are looked at: timeouts fire up to this much late.
SWEEP_INTERVAL = 0.25
_TUNNEL = State.TUNNEL
_RESPONDING = State.RESPONDING
# Reading-paused reasons, re-exported for readers of this module.
CONNECTING = CONNECTING_READS
__all__ += ["BACKPRESSURE", "CONNECTING", "PIPELINE"]


@attrs.frozen
class RelaySettings:
    timeouts: Timeouts
    limits: Limits
    pseudonym: str  # how we name ourselves in Via: the host name


@implementer(IPushProducer)
class ReadGate:
    """
    Pauses reading from a transport for any of several reasons at once and
    resumes only when none is left.
    """

    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport) -> None:
        self._transport = transport
        self._reasons = 0

    def pause(self, reason: int) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons |= reason

    def resume(self, reason: int) -> None:
        if self._reasons & reason:
            self._reasons &= ~reason
            if not self._reasons:
                self._transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause(BACKPRESSURE)

    def resumeProducing(self) -> None:
        self.resume(BACKPRESSURE)

    def stopProducing(self) -> None:
        # The consumer went away; the connection's owner decides what closes.
        self.resume(BACKPRESSURE)

    def hand_over(self) -> None:
        """A L{SplicePump} reads the transport from now on: forget every reason, resume nothing."""
        self._reasons = 0

    def lend(self) -> None:
        """
        A L{SpliceTransfer} has the transport for a while: Twisted's write
        buffers it empties are no reason to pause any more; the others stay.
        """
        self._reasons &= ~BACKPRESSURE

    def take_back(self) -> None:
        """The transfer gave the transport back: read again unless a reason holds it."""
        if not self._reasons:
            self._transport.resumeProducing()


class ProxyFactory(Factory):
    """Builds a L{ClientConnection} for each connection on one configured port."""

    noisy = False

    def __init__(
        self,
        port: PortConfig,
        *,
        settings: RelaySettings,
        connect: UpstreamConnect,
        clock: IReactorTime,
        local_addresses,
        metrics: PortMetrics,
        access_log: AccessLog | None = None,
        budget: ConnectionBudget | None = None,
        resolver: DestinationResolver | None = None,
        authenticator=None,
        stream_metrics=None,
        reactor=None,
        zerocopy: bool = True,
    ) -> None:
        self.budget = budget
        #: how tunnels are relayed (L{tproxy_twist.metrics.StreamMetrics}), or None
        self.stream_metrics = stream_metrics
        #: the reactor a L{SplicePump} registers its sockets with (the clock by default)
        self.reactor = reactor if reactor is not None else clock
        #: relay tunnels with splice(2) where both sockets allow it
        self.zerocopy = zerocopy
        #: ... and response bodies with a Content-Length ([limits] splice_body_min)
        self.splice_bodies = zerocopy and settings.limits.splice_body_min > 0
        #: tunnels' bytes moved with splice(2) ([[port]] stream_relay = "splice"),
        #: else copied through the pump
        self.splice_streams = port.stream_relay == "splice"
        self.connections: set[ClientConnection] = set()
        self._sweeper: task.LoopingCall | None = None
        self.per_client: dict[str, int] = {}
        self.port = port
        self.settings = settings
        self.connect = connect
        self.clock = clock
        self.local_addresses = local_addresses
        self.session_config = SessionConfig(
            port,
            settings.timeouts,
            settings.limits,
            settings.pseudonym,
            LogThrottle(clock),
            local_addresses,
        )
        self.via_marker = self.session_config.via_marker
        self._metrics = metrics
        self._access_log = access_log
        self.sink = RecordSink(metrics, access_log, port.name, port.mode)
        if resolver is None:
            resolver = DestinationResolver(
                getattr(clock, "nameResolver", None),
                port.destinations,
                own=local_addresses,
                builtin=port.mode == "forward",
            )
        # Resolve -> check -> connect; a port without rules whose destinations
        # are IP literals (tproxy, intercept) skips it.
        self.resolver = resolver
        self.checks_destinations = resolver.checks_anything
        self.authenticator = authenticator  # forward ports with `auth`: auth.Authenticator

    # Metrics and the access log are read by the record sink; keep it in step.
    @property
    def metrics(self) -> PortMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: PortMetrics) -> None:
        self._metrics = metrics
        self.sink = RecordSink(metrics, self._access_log, self.port.name, self.port.mode)

    @property
    def access_log(self) -> AccessLog | None:
        return self._access_log

    @access_log.setter
    def access_log(self, access_log: AccessLog | None) -> None:
        self._access_log = access_log
        self.sink = RecordSink(self._metrics, access_log, self.port.name, self.port.mode)

    def via(self, version: bytes) -> bytes | None:
        """Our Via entry for a message of C{version}, made once per version; None: via off."""
        return self.session_config.via(version)

    def buildProtocol(self, addr):
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(SWEEP_INTERVAL, now=False)
        return ClientConnection(self)

    def sweep(self) -> None:
        """Let every connection whose deadline has passed time out; flush metrics."""
        self._metrics.flush()
        if self.stream_metrics is not None:
            self.stream_metrics.flush()
        now = self.clock.seconds()
        for connection in list(self.connections):  # timing out closes some
            if connection.pump is not None or connection.body is not None:
                connection.pump_activity()
            session = connection.session
            if session is None or session.deadline_kind is None or now < session.deadline_at:
                continue
            try:
                session.tick(now)
            except Exception:
                log.failure("timing out a connection failed")
                connection.transport.abortConnection()

    def shutdown(self) -> None:
        """After draining: count what is left and stop sweeping."""
        self._metrics.flush()
        if self.stream_metrics is not None:
            self.stream_metrics.flush()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    def drain(self, min_idle: float = 1.0) -> int:
        """
        Ask every connection to finish: each closes after its current
        response; one idle for C{min_idle} seconds closes now.  Returns how
        many connections are still open.  Call again until it returns 0.
        """
        for connection in list(self.connections):
            if connection.session is not None:
                connection.session.drain(min_idle)
        return len(self.connections)

    def abort_all(self) -> None:
        """The drain timeout: end every connection now; what was in progress is logged."""
        for connection in list(self.connections):
            if connection.session is not None:
                connection.session.abort("drain")
            else:
                connection.transport.abortConnection()


class Upstream(Protocol):
    """The connection to the origin; reports everything to its client."""

    # Slots: thousands of these live at once, and a __dict__ each costs more.
    __slots__ = ("client", "link", "gate", "lost", "writer", "transport", "connected")

    def __init__(self, client: ClientConnection, link: Link) -> None:
        self.client = client
        self.link = link
        self.gate: ReadGate | None = None
        self.lost = False

    def connectionMade(self) -> None:
        # TCP_NODELAY is set on the socket before connecting (sockets.py).
        self.gate = ReadGate(self.transport)
        self.writer = writer_for(self.transport)
        self.link.handle = self
        client = self.client
        session = client.session
        if session is None:  # the client left while this connection was being made
            self.transport.abortConnection()
            return
        session.upstream_connected(self.link)
        if session.state is _TUNNEL:
            client.splice_tunnel()  # CONNECT: "200 Connection established" went out

    def dataReceived(self, data: bytes) -> None:
        self.client.upstream_data(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self.client.upstream_lost(self)
        # Its link refers back to this protocol (link.handle): dropped, so that
        # reference counting frees both, no cycle left for the cyclic GC.
        self.link = None


class _UpstreamFactory(ClientFactory):
    noisy = False  # one per upstream connection: no start/stop log lines

    def __init__(self, client: ClientConnection, link: Link) -> None:
        self.client = client
        self.link = link

    def buildProtocol(self, addr):
        return Upstream(self.client, self.link)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        session = self.client.session
        if session is not None:  # else the client left meanwhile
            session.upstream_failed(self.link, reason.value)


@implementer(IHalfCloseableProtocol)
class ClientConnection(Protocol):
    """One accepted client connection: moves bytes and events to and from its L{Session}."""

    # Slots: one of these per client connection, idle ones included.
    __slots__ = (
        "_attached",
        "_corked",
        "_counted_client",
        "_relayed_in",
        "_relayed_out",
        "body",
        "pump",
        "_writer",
        "client_ip",
        "connected",
        "factory",
        "finished",
        "gate",
        "metrics",
        "session",
        "transport",
    )

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.metrics = factory.metrics
        self.session: Session | None = None
        # SessionIO.finished: the record goes straight to the metrics and the access log.
        self.finished: Callable[[ExchangeRecord], None] = factory.sink
        self._corked: list[bytes] | None = None
        self._counted_client = False
        self.client_ip = ""
        self._attached: Upstream | None = None  # the upstream the session relays with
        self.pump: SplicePump | None = None  # while a tunnel is relayed zero-copy
        self.body: SpliceTransfer | None = None  # while a response body is spliced
        # What the pump or the body transfer moved that the session was told of.
        self._relayed_in = self._relayed_out = 0

    # --- client transport events ---------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport  # TCP_NODELAY: inherited from the listener (sockets.py)
        self.gate = ReadGate(transport)
        self._writer = writer_for(transport)
        factory = self.factory
        factory.connections.add(self)
        if factory.budget is not None:
            factory.budget.acquire()
        self.metrics.connections.inc()
        self.metrics.active.inc()
        client_ip = self.client_ip = unmap(transport.getPeer().host)
        port = factory.port
        per_client_limit = factory.settings.limits.max_connections_per_client
        if per_client_limit:
            count = factory.per_client.get(client_ip, 0)
            if count >= per_client_limit:
                log.info(
                    "refusing a connection from {client}: it already has {n} on this worker",
                    client=client_ip,
                    n=count,
                )
                self.metrics.rejected("limit")
                self.session = Session(factory.session_config, self, factory.clock, client_ip, None)
                self.session.turn_away(
                    H.simple_response(
                        429,
                        b"Too Many Requests",
                        f"too many connections from {client_ip} (limit {per_client_limit})",
                        close=True,
                    )
                )
                return
            factory.per_client[client_ip] = count + 1
            self._counted_client = True
        destination = None
        if port.mode == "tproxy":
            host = transport.getHost()
            destination = (unmap(host.host), host.port)
        elif port.mode == "intercept":
            try:
                destination = nat_original_destination(transport.getHandle())
            except OSError:
                destination = None
        refusal = policy.admission(port, client_ip, destination, factory.local_addresses)
        if refusal is not None and refusal.metric_reason == "loop" and destination is not None:
            log.warn(
                "refusing direct connection from {client} to {mode} port {name!r}: the original"
                " destination {dest} is this host's own address, so the connection was not"
                " intercepted and relaying it would loop",
                client=client_ip,
                mode=port.mode,
                name=port.name,
                dest=f"{destination[0]}:{destination[1]}",
            )
        self.session = Session(
            factory.session_config, self, factory.clock, client_ip, destination, refusal
        )

    def dataReceived(self, data: bytes) -> None:
        self.session.client_data(data)

    def readConnectionLost(self) -> None:
        self.session.client_eof()

    def writeConnectionLost(self) -> None:
        pass  # our own lingering close: the session waits for the client's end

    def connectionLost(self, reason: Failure) -> None:
        factory = self.factory
        factory.connections.discard(self)
        if factory.budget is not None:
            factory.budget.release()
        if self._counted_client:
            self._counted_client = False
            left = factory.per_client[self.client_ip] - 1
            if left:
                factory.per_client[self.client_ip] = left
            else:
                del factory.per_client[self.client_ip]
        self.metrics.active.dec()
        session = self.session
        if session is not None:
            session.client_lost()
            bytes_in, bytes_out = session.unrecorded_bytes()
            if bytes_in or bytes_out:
                self.metrics.transferred(bytes_in, bytes_out)
        self._let_go()

    def _let_go(self) -> None:
        """
        The connection is gone: drop what refers back to it (the session's
        adapter is this connection, a pump's callbacks and C{finished} are its
        methods), so that reference counting frees it, without the cyclic GC.
        Late events (an upstream connected, failed, speaking or lost after the
        client left) find no session and change nothing but their own
        connection.
        """
        self.session = None
        self.pump = None
        self.finished = self.factory.sink

    # --- upstream transport events ----------------------------------------------------

    def upstream_data(self, upstream: Upstream, data: bytes) -> None:
        session = self.session
        if session is None:
            return  # the client left: an upstream being closed still spoke
        # Corked: a response's head and body (and the next pipelined answer)
        # go to the writer in one write: one TLS record on a bumped connection
        # (the socket's writes of a batch go in one send anyway: DirectWriter).
        self._corked = []
        try:
            session.upstream_data(upstream.link, data)
        finally:
            self._uncork()
        state = session.state
        if state is _TUNNEL and self.pump is None:
            self.splice_tunnel()  # a 101 upgrade: its head went out just now
        elif state is _RESPONDING and self.factory.splice_bodies:
            self.splice_body(upstream)

    # --- zero-copy tunnels ----------------------------------------------------------------

    def splice_tunnel(self) -> None:
        """The session became a tunnel: relay it with splice(2) if both sockets allow."""
        upstream = self._attached
        if self.pump is not None or upstream is None or upstream.lost:
            return
        client, server = self.transport, upstream.transport
        factory = self.factory
        # Producers would resume reading behind the pump's back.
        self._writer.drop_producer(upstream.gate)
        upstream.writer.drop_producer(self.gate)
        if not (factory.zerocopy and can_splice(client) and can_splice(server)):
            if client.producer is None:  # relayed through Twisted, with backpressure
                client.registerProducer(upstream.gate, True)
            if server.producer is None:
                server.registerProducer(self.gate, True)
            if factory.stream_metrics is not None:
                factory.stream_metrics.started("copy")
            return
        self.gate.hand_over()
        upstream.gate.hand_over()
        self._relayed_in = self._relayed_out = 0
        self.finished = self._finished_spliced
        splice = factory.splice_streams
        self.pump = SplicePump(
            client,
            server,
            reactor=factory.reactor,
            clock=factory.clock,
            on_end=self._pump_ended,
            on_eof=self._pump_eof,
            copy=not splice,
        )
        if factory.stream_metrics is not None:
            factory.stream_metrics.started("splice" if splice else "copy")
        self.pump.start()

    def pump_activity(self) -> None:
        """
        The sweep's look at a spliced tunnel or body: the bytes moved since
        the last look go to the session (its record, and its idle deadline).
        """
        n_in, n_out = self._unreported()
        if n_in or n_out:
            self.session.relayed(n_in, n_out)

    def _unreported(self) -> tuple[int, int]:
        """Bytes the pump or the body transfer moved since the session was last told."""
        body = self.body
        if body is not None:
            moved_in, moved_out = 0, body.moved
        elif self.pump is not None:
            moved_in, moved_out = self.pump.a_to_b, self.pump.b_to_a
        else:
            return 0, 0
        n_in, n_out = moved_in - self._relayed_in, moved_out - self._relayed_out
        self._relayed_in, self._relayed_out = moved_in, moved_out
        return n_in, n_out

    def _pump_eof(self, transport) -> None:
        if transport is self.transport and self.session is not None:
            self.session.client_eof()  # the pump shut the upstream's writing already

    def _pump_ended(self, reason: str) -> None:
        pass  # both transports are closing: their connectionLost tells the session

    def _finished_spliced(self, record: ExchangeRecord) -> None:
        # A record written between two sweeps: what was moved since the last one is its too.
        n_in, n_out = self._unreported()
        record.bytes_in += n_in
        record.bytes_out += n_out
        self.factory.sink(record)

    # --- zero-copy bodies -----------------------------------------------------------------

    def splice_body(self, upstream: Upstream) -> None:
        """
        The rest of a response body with a Content-Length goes upstream →
        client with splice(2), if the session offers it and both sockets allow;
        then both connections are Twisted's again for the next exchange.
        """
        if self.body is not None or upstream is not self._attached:
            return
        session = self.session
        length = session.body_to_splice()
        if not length or not can_splice_body(upstream.transport, self.transport):
            return
        session.splicing_body()
        self.gate.lend()
        upstream.gate.lend()
        self._relayed_in = self._relayed_out = 0
        self.finished = self._finished_spliced
        factory = self.factory
        body = self.body = SpliceTransfer(
            upstream.transport,
            self.transport,
            length,
            reactor=factory.reactor,
            clock=factory.clock,
            on_end=self._body_ended,
        )
        if factory.stream_metrics is not None:
            factory.stream_metrics.started("splice")
        body.start()

    def _body_ended(self, reason: str) -> None:
        n_in, n_out = self._unreported()
        self.body = None
        self.finished = self.factory.sink
        session = self.session
        if session is None:
            return  # the client left: nothing is relayed any more
        session.relayed(n_in, n_out)
        if reason != DONE:
            session.body_splice_failed(upstream=reason != SINK_FAILED)
            return
        upstream = self._attached
        self.gate.take_back()
        upstream.gate.take_back()
        self._corked = []
        try:
            session.body_spliced()
        finally:
            self._uncork()

    def _stop_body(self) -> None:
        """The session ends the exchange while its body is spliced (timeout, drain, abort)."""
        n_in, n_out = self._unreported()
        self.body.abort()
        self.body = None
        self.finished = self.factory.sink
        self.session.relayed(n_in, n_out)

    def upstream_lost(self, upstream: Upstream) -> None:
        if self._attached is upstream:
            self._attached = None
        self._writer.drop_producer(upstream.gate)
        self.gate.resume(BACKPRESSURE)
        session = self.session
        if session is None:
            return  # the client left before this upstream connection ended
        self._corked = []
        try:
            session.upstream_lost(upstream.link)
        finally:
            self._uncork()

    # --- SessionIO: what the session asks ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            self._writer.write(data)

    def write_sequence(self, parts: list[bytes]) -> None:
        if self._corked is not None:
            self._corked.extend(parts)
        else:
            self._writer.write_sequence(parts)

    def _uncork(self) -> None:
        """Send what was written while corked, in one system call."""
        parts = self._corked
        self._corked = None
        if parts:
            if len(parts) == 1:
                self._writer.write(parts[0])
            else:
                self._writer.write_sequence(parts)

    def close(self) -> None:
        if self.body is not None:
            self._stop_body()
        if self.pump is not None:
            # The pump closes both sides when it ends; a session ends a live
            # tunnel itself only when something failed.
            self.pump.abort()
            return
        self._uncork()
        self.transport.loseConnection()

    def abort(self) -> None:
        self._corked = None
        if self.body is not None:
            self._stop_body()
        if self.pump is not None:
            self.pump.abort()  # it resets both connections itself (or closed them already)
            return
        self.transport.abortConnection()

    def shutdown_write(self) -> None:
        self._uncork()
        self.transport.loseWriteConnection()

    def pause(self, reason: int) -> None:
        self.gate.pause(reason)

    def resume(self, reason: int) -> None:
        self.gate.resume(reason)

    def connect(self, link: Link, destination: tuple[str, int], source_ip: str | None) -> None:
        factory = self.factory
        if not factory.checks_destinations:
            self._connect(link, destination[0], destination[1], source_ip)
            return
        # Resolve -> check -> connect to a checked IP literal, never to the name.
        d = factory.resolver.resolve(destination[0], destination[1])
        d.addCallbacks(
            self._resolved,
            self._not_resolved,
            callbackArgs=(link, source_ip),
            errbackArgs=(link,),
        )
        d.addErrback(lambda failure: log.failure("connecting upstream failed", failure))

    def _resolved(self, resolved: Resolved, link: Link, source_ip: str | None) -> None:
        if self.session is None or self.session.state is not _CONNECTING:
            return  # answered or gone while the name was being resolved
        link.address = resolved.addresses[0]
        self._connect(link, link.address, resolved.port, source_ip)

    def _not_resolved(self, failure: Failure, link: Link) -> None:
        if self.session is not None:
            self.session.upstream_failed(link, failure.value)

    def _connect(self, link: Link, host: str, port: int, source_ip: str | None) -> None:
        factory = self.factory
        factory.connect(
            host, port, _UpstreamFactory(self, link), factory.settings.timeouts.connect, source_ip
        )

    def authenticate(self, link: Link, client_ip: str, credentials: bytes | None) -> None:
        d = self.factory.authenticator.check(client_ip, credentials)
        d.addCallback(self._authenticated, link)
        d.addErrback(lambda failure: log.failure("authenticating a request failed", failure))

    def _authenticated(self, result, link: Link) -> None:
        if self.session is not None:
            self.session.authenticated(link, result)

    def attach(self, link: Link) -> None:
        # Backpressure both ways: a full send buffer on one side pauses
        # reading on the other.
        # (Registered with each transport once a write to it is buffered: sockets.DirectWriter.)
        upstream: Upstream = link.handle
        self._attached = upstream
        upstream.writer.set_producer(self.gate)
        self._writer.set_producer(upstream.gate)

    def upstream_write(self, link: Link, data: bytes) -> None:
        if self.pump is None:
            link.handle.writer.write(data)

    def upstream_write_sequence(self, link: Link, parts: list[bytes]) -> None:
        link.handle.writer.write_sequence(parts)

    def upstream_close(self, link: Link) -> None:
        if self.body is not None:
            self._stop_body()
        if self.pump is not None:
            self.pump.abort()  # ditto
            return
        upstream: Upstream = link.handle
        self._writer.drop_producer(upstream.gate)
        if not upstream.lost:
            upstream.transport.unregisterProducer()
            upstream.transport.loseConnection()
        # Reading from the client may have been paused by this upstream's
        # full send buffer; that reason is gone with it.
        self.gate.resume(BACKPRESSURE)

    def upstream_abort(self, link: Link) -> None:
        if self.body is not None:
            self._stop_body()
        if self.pump is not None:
            self.pump.abort()  # ditto
            return
        upstream: Upstream = link.handle
        if upstream is not None and not upstream.lost:
            upstream.transport.abortConnection()

    def upstream_shutdown_write(self, link: Link) -> None:
        if self.pump is None:
            link.handle.transport.loseWriteConnection()

    def large_reads(self, link: Link | None, large: bool) -> None:
        if large:
            # A large body: fewer, larger reads (Twisted reads 64 KiB at a time).
            target = self.transport if link is None else link.handle.transport
            target.bufferSize = _LARGE_READ
            return
        self.transport.bufferSize = _DEFAULT_READ
        if link is not None and link.handle is not None:
            link.handle.transport.bufferSize = _DEFAULT_READ


class ConnectionBudget:
    """
    max_connections for a whole worker: when every slot is taken the
    listeners stop accepting (new connections wait in the kernel's queue)
    until one is free, as nginx's worker_connections does.
    """

    def __init__(self, limit: int, on_full: Callable[[], None], on_free: Callable[[], None]):
        self.limit = limit
        self.used = 0
        self._on_full = on_full
        self._on_free = on_free

    def acquire(self) -> None:
        self.used += 1
        if self.used == self.limit:
            log.warn("{n} connections: not accepting more until one closes", n=self.used)
            self._on_full()

    def release(self) -> None:
        self.used -= 1
        if self.used == self.limit - 1:
            self._on_free()
