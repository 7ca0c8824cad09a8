"""
The HTTP relay: Twisted protocols that move bytes between a client
connection and its pinned upstream connection.

Framing decisions are made by the sans-IO readers in L{framing}; header
rules live in L{headers}; this module only glues them to transports, timers,
backpressure and metrics.

One client connection has at most one upstream connection at a time.  On
tproxy ports it is bound to the client's own address, so it is never shared
with another client.  Requests on one client connection are handled one at
a time, in order: pipelined requests wait in the reader (and in the kernel,
since reading from the client pauses) until the previous response is done.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable

import attrs
from twisted.internet import error as neterror
from twisted.internet import task
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..accesslog import AccessEntry, AccessLog
from ..config import Limits, PortConfig, Timeouts
from ..metrics import PortMetrics
from ..sockets import (
    SPOOF_ERRNOS,
    UpstreamConnect,
    nat_original_destination,
    unmap,
    writer_for,
)
from . import headers as H
from .framing import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Data,
    EndOfMessage,
    ProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)
from .target import parse_authority, split_absolute

log = Logger()

REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}

_CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# A client that was answered with an error may still be sending its body;
# closing at once would reset the connection and could destroy the answer
# before the client reads it (nginx's "lingering close").
_LINGER_SECONDS = 2.0
_LARGE_BODY = 1 << 20
_DEFAULT_READ = 1 << 16  # Twisted's FileDescriptor.bufferSize
_LARGE_READ = 1 << 18
# Bytes a client may send ahead while its upstream connection is being made.
_CONNECTING_BUFFER = 65536
# How often deadlines are looked at: timeouts fire up to this much late.
SWEEP_INTERVAL = 0.25


@attrs.frozen
class RelaySettings:
    timeouts: Timeouts
    limits: Limits
    pseudonym: str  # how we name ourselves in Via: the host name


# Why reading from a transport is paused (bits of ReadGate's mask).
BACKPRESSURE = 1  # the other side's send buffer is full
CONNECTING = 2  # waiting for the upstream connection
PIPELINE = 4  # a pipelined request waits for the current answer


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
    ) -> None:
        self.access_log = access_log
        self.budget = budget
        self.allow_all = port.allows_everyone
        self.connections: set[ClientConnection] = set()
        self._sweeper: task.LoopingCall | None = None
        self._via: dict[bytes, bytes] = {}
        # What our own Via entries contain; seeing it on a request means a loop.
        self.via_marker = f"{settings.pseudonym} (tproxy-twist)".encode()
        self.per_client: dict[str, int] = {}
        self.port = port
        self.settings = settings
        self.connect = connect
        self.clock = clock
        self.local_addresses = local_addresses
        self.metrics = metrics

    def via(self, version: bytes) -> bytes:
        """Our Via entry for a message of C{version}, made once per version."""
        entry = self._via.get(version)
        if entry is None:
            entry = self._via[version] = H.via_value(version, self.settings.pseudonym)
        return entry

    def buildProtocol(self, addr):
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self.sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(SWEEP_INTERVAL, now=False)
        return ClientConnection(self)

    def sweep(self) -> None:
        """Let every connection whose deadline has passed time out; flush metrics."""
        self.metrics.flush()
        now = self.clock.seconds()
        for connection in list(self.connections):  # timing out closes some
            try:
                connection.check_deadline(now)
            except Exception:
                log.failure("timing out a connection failed")

    def shutdown(self) -> None:
        """After draining: count what is left and stop sweeping."""
        self.metrics.flush()
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
            connection.drain(min_idle)
        return len(self.connections)

    def abort_all(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()


class _Exchange:
    """One request and its response, as the relay tracks it."""

    __slots__ = (
        "request",
        "started",
        "head",
        "chunked_out",
        "request_done",
        "response_started",
        "response_chunked",
        "status",
        "close_client",
        "tunnel",
        "connect_started",
        "replayable",
        "upstream_keep_alive",
        "large",
        "destination",
        "url",
        "target",
        "host",
        "content_type",
        "denied",
    )

    def __init__(self, request: Request, started: float) -> None:
        self.request = request
        self.started = started
        self.head = b""  # the serialized head sent upstream
        self.chunked_out = False  # request body re-chunked upstream
        self.request_done = False  # whole request written upstream
        self.response_started = False
        self.response_chunked = False  # response body re-chunked to the client
        self.status = 0
        self.close_client = not request.keep_alive
        self.tunnel = False  # CONNECT or Upgrade
        self.connect_started = 0.0
        self.replayable = False  # may be resent once on a fresh connection
        self.upstream_keep_alive = True
        self.large = False  # reads were made larger for a large body
        self.destination: tuple[str, int] | None = None
        self.url = b"-"  # as logged when there is no target (CONNECT: its authority)
        self.target: bytes | None = None  # what was sent upstream, for the access log
        self.host: bytes | None = None  # a Host taken from an absolute-form target
        self.content_type = b"-"
        self.denied = False  # refused by policy (403, loops): Squid's TCP_DENIED


class Upstream(Protocol):
    """The connection to the origin; reports everything to its client."""

    # Slots: thousands of these live at once, and a __dict__ each costs more.
    __slots__ = (
        "client",
        "destination",
        "reader",
        "gate",
        "served",
        "lost",
        "writer",
        "transport",
        "connected",
    )

    def __init__(self, client: ClientConnection, destination: tuple[str, int]) -> None:
        self.client = client
        self.destination = destination
        self.reader: ResponseReader | None = None
        self.gate: ReadGate | None = None
        self.served = 0  # responses completed on this connection
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.gate = ReadGate(self.transport)
        self.writer = writer_for(self.transport)
        self.client.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.upstream_data(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self.client.upstream_lost(self, reason)


class _UpstreamFactory(ClientFactory):
    noisy = False  # one per upstream connection: no start/stop log lines

    def __init__(self, client: ClientConnection, destination: tuple[str, int]) -> None:
        self.client = client
        self.destination = destination

    def buildProtocol(self, addr):
        return Upstream(self.client, self.destination)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.client.upstream_failed(self.destination, reason)


class ClientConnection(Protocol):
    """One accepted client connection and everything relayed for it."""

    # Slots: one of these per client connection, idle ones included.
    __slots__ = (
        "_body_left",
        "_bytes_in",
        "_bytes_out",
        "_clock",
        "_closed",
        "_connecting",
        "_corked",
        "_counted_client",
        "_deadline",
        "_discarding",
        "_draining",
        "_exchange",
        "_host_agreed",
        "_last_activity",
        "_reader",
        "_refusal",
        "_timer_kind",
        "_tunnel",
        "_upstream",
        "_writer",
        "client_ip",
        "connected",
        "destination",
        "factory",
        "gate",
        "metrics",
        "port",
        "transport",
    )

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.port = factory.port
        self.metrics = factory.metrics
        self._clock = factory.clock
        limits = factory.settings.limits
        self._reader = RequestReader(
            max_line=limits.max_request_line,
            max_head=limits.max_header_size,
            max_field_line=limits.max_header_size,
            max_fields=limits.max_header_fields,
            max_chunk_ext=limits.max_chunk_extensions,
        )
        self._upstream: Upstream | None = None
        self._connecting: tuple[str, int] | None = None
        self._exchange: _Exchange | None = None
        self._timer_kind = ""
        self._corked: list[bytes] | None = None
        self._deadline = 0.0
        self._last_activity = 0.0
        self._tunnel = False
        self._draining = False
        self._discarding = False
        self._closed = False
        self._bytes_in = 0
        self._bytes_out = 0
        self._counted_client = False
        self._host_agreed: bytes | None = None
        self._body_left = 0  # bytes a request body may still have under max_body_size
        self.client_ip = ""
        self.destination: tuple[str, int] | None = None
        self._refusal: tuple[int, str, str] | None = None  # (status, text, metric reason)

    # --- client side -------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        transport.setTcpNoDelay(True)
        self.gate = ReadGate(transport)
        self._writer = writer_for(transport)
        factory = self.factory
        factory.connections.add(self)
        if factory.budget is not None:
            factory.budget.acquire()
        self.metrics.connections.inc()
        self.metrics.active.inc()
        self.client_ip = unmap(transport.getPeer().host)
        self._last_activity = self._clock.seconds()
        mode = self.port.mode
        per_client_limit = factory.settings.limits.max_connections_per_client
        if per_client_limit:
            count = factory.per_client.get(self.client_ip, 0)
            if count >= per_client_limit:
                log.info(
                    "refusing a connection from {client}: it already has {n} on this worker",
                    client=self.client_ip,
                    n=count,
                )
                self.metrics.rejected("limit")
                self._write(
                    H.simple_response(
                        429,
                        b"Too Many Requests",
                        f"too many connections from {self.client_ip} (limit {per_client_limit})",
                        close=True,
                    )
                )
                self._linger()
                return
            factory.per_client[self.client_ip] = count + 1
            self._counted_client = True
        if not factory.allow_all and not self.port.allows(self.client_ip):
            self._refusal = (403, "access denied: your address may not use this proxy", "forbidden")
        elif mode == "tproxy":
            host = transport.getHost()
            self.destination = (unmap(host.host), host.port)
        elif mode == "intercept":
            try:
                self.destination = nat_original_destination(transport.getHandle())
            except OSError:
                self.destination = None
                self._refusal = (
                    403,
                    "this port only serves NAT-intercepted traffic (no original destination)",
                    "loop",
                )
        if self.destination is not None and self.destination[0] in self.factory.local_addresses:
            log.warn(
                "refusing direct connection from {client} to {port} port {name!r}: the original"
                " destination {dest} is this host's own address, so the connection was not"
                " intercepted and relaying it would loop",
                client=self.client_ip,
                port=mode,
                name=self.port.name,
                dest=f"{self.destination[0]}:{self.destination[1]}",
            )
            self._refusal = (
                403,
                f"direct connections to this {mode} port are refused: it only serves"
                " intercepted traffic (relaying would loop)",
                "loop",
            )
        self._arm("client_idle", self.factory.settings.timeouts.client_idle)

    def dataReceived(self, data: bytes) -> None:
        self._bytes_in += len(data)
        self._last_activity = self._clock.seconds()
        if self._tunnel:
            if self._upstream is not None:
                self._upstream.writer.write(data)
            return
        if self._discarding:
            return
        self._reader.feed(data)
        if self._connecting is not None:
            if self._reader.buffered > _CONNECTING_BUFFER:
                self.gate.pause(CONNECTING)
            return
        self._process()
        if self._timer_kind == "client_idle" and not self._reader.idle:
            # Part of a head came; a whole one would have started an exchange.
            self._arm("request_header", self.factory.settings.timeouts.request_header)

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        factory = self.factory
        factory.connections.discard(self)
        if factory.budget is not None:
            factory.budget.release()
        if self._counted_client:
            left = factory.per_client[self.client_ip] - 1
            if left:
                factory.per_client[self.client_ip] = left
            else:
                del factory.per_client[self.client_ip]
        self._cancel_timer()
        self.metrics.active.dec()
        if self._exchange is not None:
            # A tunnel ends, or the client left before its answer was complete
            # (status 0 then, Squid's "000").
            exchange, self._exchange = self._exchange, None
            self._record(exchange)
        self._flush_bytes()
        upstream = self._upstream
        self._upstream = None
        if upstream is not None and not upstream.lost:
            upstream.transport.abortConnection()

    def drain(self, min_idle: float) -> None:
        """Finish: close after the current response, or now if idle long enough."""
        self._draining = True
        if (
            self._exchange is None
            and self._connecting is None
            and not self._tunnel
            and self._reader.idle
            and self._clock.seconds() - self._last_activity >= min_idle
        ):
            # Idle for a while: no request is likely to be on its way, so
            # closing cannot race with one (a client would see a reset).
            self._lose()

    def _process(self) -> None:
        """Handle the request events the reader has, until it needs something."""
        reader = self._reader
        while not (self._discarding or self._closed or self._tunnel):
            if self._connecting is not None:
                return  # resumed by upstream_connected
            try:
                event = reader.next_event()
            except ProtocolError as e:
                self._reject(e.status, e.reason, "bad_request")
                return
            kind = type(event)
            if kind is Data:
                self._send_body(event.data)
            elif kind is Request:
                self._start_request(event)
            elif kind is EndOfMessage:
                self._request_body_done(event.trailers)
            elif event is NEED_DATA:
                return
            elif event is PAUSED:
                if not reader.idle:
                    # A pipelined request is already here: read no more until
                    # the current one is answered.
                    self.gate.pause(PIPELINE)
                return
            elif event is CLOSED:
                self._lose()
                return

    def _start_request(self, request: Request) -> None:
        self._arm("idle", self.factory.settings.timeouts.idle)
        exchange = self._exchange = _Exchange(request, self._clock.seconds())
        if self._refusal is not None:
            status, text, reason = self._refusal
            self._reject(status, text, reason)
            return
        if self.factory.via_marker in b",".join(request.get_all(b"via")):
            self._reject(508, "forwarding loop: this request already passed through us", "loop")
            return
        try:
            destination, target, host = self._route(request)
        except ProtocolError as e:
            self._reject(e.status, e.reason, "forbidden" if e.status == 403 else "bad_request")
            return
        max_body = self.factory.settings.limits.max_body_size
        if max_body:
            if request.body == "length" and request.content_length > max_body:
                self._reject(413, f"request body larger than {max_body} bytes", "limit")
                return
            self._body_left = max_body
        if self.port.mode != "forward" and not self._host_agrees(request, host):
            return
        exchange.destination = destination
        if request.method == b"CONNECT":
            exchange.url = target
            exchange.tunnel = True
            self._use_upstream(destination)
            return
        exchange.target = target
        exchange.host = host
        fields = request.headers
        upgrade = request.get(b"upgrade") is not None and b"upgrade" in H.connection_tokens(fields)
        fields = H.strip_hop_by_hop(fields, keep_upgrade=upgrade)
        if host is not None:
            fields = [(n, v) for n, v in fields if n.lower() != b"host"]
            fields.insert(0, (b"Host", host))
        fields = H.add_via(fields, self.factory.via(request.version))
        if self.port.x_forwarded_for != "off":
            fields = _x_forwarded_for(fields, self.port.x_forwarded_for, self.client_ip)
        if request.body == "chunked":
            fields.append((b"Transfer-Encoding", b"chunked"))
            exchange.chunked_out = True
        if request.body == "chunked" or (request.content_length or 0) > _LARGE_BODY:
            self.transport.bufferSize = _LARGE_READ  # a large upload: larger reads
            exchange.large = True
        exchange.tunnel = upgrade
        exchange.head = H.serialize_request_head(request.method, target, fields)
        exchange.replayable = request.body == "none"
        self._use_upstream(destination)

    def _host_agrees(self, request: Request, authority: bytes | None) -> bool:
        """
        On intercepting ports the original destination decides where we
        connect; a Host naming another IP address or port is logged and
        counted, and refused with 409 under host_verify_strict (as Squid's
        host_verify_strict).  Host names cannot be checked without DNS.
        """
        named = authority or request.get(b"host")
        if named is None or named == self._host_agreed:
            return True
        try:
            host, port = parse_authority(named, 80)
        except ProtocolError:
            return True  # the framing already checked its syntax
        dest_host, dest_port = self.destination
        if port == dest_port and (not _is_ip_literal(host) or unmap(host) == dest_host):
            self._host_agreed = named  # keep-alive requests repeat their Host
            return True
        self.metrics.host_mismatch.inc()
        log.info(
            "Host {named} does not match the original destination {dest} (client {client})",
            named=named.decode("ascii", "replace"),
            dest=f"{dest_host}:{dest_port}",
            client=self.client_ip,
        )
        if not self.port.host_verify_strict:
            return True
        self._reject(
            409,
            f"Host {named.decode('ascii', 'replace')} does not match the destination"
            f" this connection was made to ({dest_host}:{dest_port})",
            "forbidden",
        )
        return False

    def _body_too_large(self) -> None:
        limit = self.factory.settings.limits.max_body_size
        self.metrics.rejected("limit")
        exchange = self._exchange
        if exchange is not None and not exchange.response_started:
            self._reject(413, f"request body larger than {limit} bytes", None)
        else:
            if exchange is not None:
                self._exchange = None
                self._record(exchange)
            self.transport.abortConnection()

    def _route(self, request: Request) -> tuple[tuple[str, int], bytes, bytes | None]:
        """Where this request goes: (destination, target to send, new Host or None)."""
        target = request.target
        if self.port.mode != "forward":
            if request.method == b"CONNECT":
                raise ProtocolError(405, f"CONNECT is not allowed on a {self.port.mode} port")
            if target.startswith(b"/") or target == b"*":
                return self.destination, target, None
            # RFC 9112 3.2.2 / 7.2: an absolute-form target replaces Host.  The
            # connection still goes to the original destination, never to the
            # host the client names (CVE-2009-0801).
            _, authority, path = split_absolute(target)
            return self.destination, path, authority
        if request.method == b"CONNECT":
            host, port = parse_authority(target, None)
            if port not in self.port.connect_ports:
                raise ProtocolError(403, f"CONNECT to port {port} is not allowed")
            return (host, port), target, None
        if target.startswith(b"/"):
            raise ProtocolError(
                400,
                "this is a forward proxy port: requests need an absolute URL (http://host/path)",
            )
        scheme, authority, path = split_absolute(target)
        if scheme != b"http":
            raise ProtocolError(501, f"{scheme.decode('ascii', 'replace')}:// URLs need CONNECT")
        return parse_authority(authority, 80), path, authority

    def _use_upstream(self, destination: tuple[str, int]) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.destination == destination and not upstream.lost:
            self._send_head(upstream)
            return
        if upstream is not None:
            self._drop_upstream(upstream)
        self._connecting = destination
        # Reading goes on while connecting (pausing and resuming costs two
        # epoll_ctl calls per connection); what arrives waits in the reader,
        # and dataReceived pauses once that is more than a socket read.
        exchange = self._exchange
        exchange.connect_started = self._clock.seconds()
        spoof = self.client_ip if self.port.spoof_client_ip else None
        self.factory.connect(
            destination[0],
            destination[1],
            _UpstreamFactory(self, destination),
            self.factory.settings.timeouts.connect,
            spoof,
        )

    def _send_head(self, upstream: Upstream) -> None:
        exchange = self._exchange
        if exchange.request.method == b"CONNECT":
            self._write(_CONNECT_ESTABLISHED)
            exchange.status = 200
            exchange.response_started = True
            self._become_tunnel(upstream)
            return
        upstream.reader.expect(exchange.request.method)
        upstream.writer.write(exchange.head)
        self._arm("idle", self.factory.settings.timeouts.idle)

    def _send_body(self, data: bytes) -> None:
        if self._body_left:
            self._body_left -= len(data)
            if self._body_left < 0:  # a chunked body grew past max_body_size
                self._body_too_large()
                return
        upstream = self._upstream
        if upstream is None or upstream.lost:
            return
        if self._exchange.chunked_out:
            upstream.writer.write_sequence(H.encode_chunk(data))
        else:
            upstream.writer.write(data)

    def _request_body_done(self, trailers) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.request_done = True
        if exchange.chunked_out and self._upstream is not None and not self._upstream.lost:
            self._upstream.writer.write(H.last_chunk(H.forwardable_trailers(trailers)))
        if exchange.response_started:
            return
        self._arm("response", self.factory.settings.timeouts.response)

    # --- upstream side -------------------------------------------------------

    def upstream_connected(self, upstream: Upstream) -> None:
        if self._closed or self._connecting != upstream.destination:
            upstream.transport.abortConnection()
            return
        exchange = self._exchange
        self.metrics.connect_duration.observe(self._clock.seconds() - exchange.connect_started)
        self._connecting = None
        self._upstream = upstream
        limits = self.factory.settings.limits
        upstream.reader = ResponseReader(
            max_line=limits.max_response_header_size,
            max_head=limits.max_response_header_size,
            max_field_line=limits.max_response_header_size,
            max_fields=limits.max_header_fields,
            max_chunk_ext=limits.max_chunk_extensions,
        )
        # Backpressure both ways: a full send buffer on one side pauses
        # reading on the other.
        upstream.transport.registerProducer(self.gate, True)
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(upstream.gate, True)
        self.gate.resume(CONNECTING)
        self._send_head(upstream)
        self._process()

    def upstream_failed(self, destination: tuple[str, int], reason: Failure) -> None:
        if self._closed or self._connecting != destination:
            return
        self._connecting = None
        self.gate.resume(CONNECTING)
        status, cause, label = classify_connect_failure(reason.value)
        where = f"{destination[0]}:{destination[1]}"
        if label == "spoof":
            log.error(
                "cannot connect to {dest} from client address {client} (errno {errno}: {error})."
                " Likely causes: the proxy lacks CAP_NET_ADMIN/CAP_NET_RAW, or this port"
                " receives traffic that was not TPROXY-diverted, or replies to the client"
                " address are not routed back to this host (ip rule fwmark + local route).",
                dest=where,
                client=self.client_ip,
                errno=getattr(reason.value, "osError", None) or "?",
                error=cause,
            )
        else:
            log.info("upstream {dest} failed: {cause}", dest=where, cause=cause)
        self.metrics.upstream_error(label)
        self._reject(status, f"cannot connect to {where}: {cause}", None)

    def upstream_data(self, upstream: Upstream, data: bytes) -> None:
        if upstream is not self._upstream:
            return
        self._last_activity = self._clock.seconds()
        if self._tunnel:
            self._write(data)
            return
        exchange = self._exchange
        if exchange is None:
            # An idle keep-alive upstream must not speak: nothing to answer.
            self._drop_upstream(upstream)
            return
        # Corked: a response's head and body (and the next pipelined answer)
        # leave in one send instead of one per piece.
        self._corked = []
        upstream.reader.feed(data)
        try:
            self._relay_response(upstream)
        finally:
            self._uncork()

    def _relay_response(self, upstream: Upstream) -> None:
        reader = upstream.reader
        while self._upstream is upstream and self._exchange is not None:
            exchange = self._exchange
            try:
                event = reader.next_event()
            except ProtocolError as e:
                if upstream.lost:  # cut off mid-message
                    self.metrics.upstream_error("reset")
                    self._upstream_broke(upstream, f"upstream closed the connection: {e.reason}")
                else:
                    self.metrics.upstream_error("bad_response")
                    self._upstream_broke(upstream, f"invalid response from upstream: {e.reason}")
                return
            kind = type(event)
            if kind is Data:
                if exchange.response_chunked:
                    self._write_sequence(H.encode_chunk(event.data))
                else:
                    self._write(event.data)
            elif kind is Response:
                if event.interim:
                    self._relay_interim(event)
                    continue
                self._relay_response_head(upstream, exchange, event)
            elif kind is EndOfMessage:
                if not exchange.response_started:  # the end of a 1xx interim response
                    reader.start_next()
                    continue
                if exchange.response_chunked:
                    self._write(H.last_chunk(event.trailers))
                reader.start_next()
                upstream.served += 1
                self._finish_exchange(upstream)
            else:  # NEED_DATA, PAUSED (after a tunnel head) or CLOSED
                return

    def _relay_interim(self, response: Response) -> None:
        if self._exchange.request.version == b"HTTP/1.1":
            fields = H.strip_hop_by_hop(response.headers)
            self._write(H.serialize_response_head(response.status, response.reason, fields))

    def _relay_response_head(self, upstream: Upstream, exchange: _Exchange, response) -> None:
        exchange.response_started = True
        exchange.status = response.status
        exchange.content_type = response.get(b"content-type") or b"-"
        exchange.upstream_keep_alive = response.keep_alive and not exchange.tunnel
        timeouts = self.factory.settings.timeouts
        self._arm("idle", timeouts.idle)
        tunnel = response.body == "tunnel" and exchange.tunnel
        fields = H.strip_hop_by_hop(response.headers, keep_upgrade=tunnel)
        if response.body != "none" and (
            response.content_length is None or response.content_length > _LARGE_BODY
        ):
            # A large body: fewer, larger reads (Twisted reads 64 KiB at a time);
            # back to the default when the exchange ends.
            upstream.transport.bufferSize = _LARGE_READ
            exchange.large = True
        if response.body == "chunked":
            exchange.response_chunked = True
        elif response.body == "close":
            # Delimited by close upstream: chunk it for an HTTP/1.1 client so the
            # client connection stays reusable; an HTTP/1.0 client needs the close.
            if exchange.request.version == b"HTTP/1.1":
                exchange.response_chunked = True
            else:
                exchange.close_client = True
        if exchange.response_chunked:
            fields.append((b"Transfer-Encoding", b"chunked"))
        if not exchange.request_done or self._draining:
            # An early answer while the request body is still arriving: the
            # rest of that body cannot be told apart from a next request.
            # Draining: this is the connection's last answer.
            exchange.close_client = True
        if exchange.close_client and not tunnel:
            fields.append((b"Connection", b"close"))
        elif exchange.request.version == b"HTTP/1.0":
            fields.append((b"Connection", b"keep-alive"))
        fields = H.add_via(fields, self.factory.via(response.version))
        self._write(H.serialize_response_head(response.status, response.reason, fields))
        if response.body == "tunnel":
            if tunnel:
                self._become_tunnel(upstream)
            else:
                # 101 to a request that did not ask to upgrade: nothing sane follows.
                self._upstream_broke(upstream, "upstream switched protocols unasked")

    def _become_tunnel(self, upstream: Upstream) -> None:
        self._tunnel = True
        self._arm("idle", self.factory.settings.timeouts.idle)
        pending = upstream.reader.take_buffered() if upstream.reader is not None else b""
        if pending:
            self._write(pending)
        pending = self._reader.take_buffered()
        if pending:
            upstream.writer.write(pending)
        self.gate.resume(PIPELINE)

    def _finish_exchange(self, upstream: Upstream) -> None:
        exchange = self._exchange
        self._exchange = None
        if exchange.large:
            upstream.transport.bufferSize = _DEFAULT_READ
            self.transport.bufferSize = _DEFAULT_READ
        self._record(exchange)
        if not exchange.upstream_keep_alive:
            self._drop_upstream(upstream)
        if exchange.close_client or not exchange.request_done:
            self._flush_bytes()
            self._lose()
            self._discarding = True
            return
        self._reader.start_next()
        self._arm("client_idle", self.factory.settings.timeouts.client_idle)
        self.gate.resume(PIPELINE)
        self._process()

    def upstream_lost(self, upstream: Upstream, reason: Failure) -> None:
        if upstream is not self._upstream:
            return
        if self.transport.producer is upstream.gate:
            self.transport.unregisterProducer()
        exchange = self._exchange
        if self._tunnel:
            self._upstream = None
            if exchange is not None:
                self._exchange = None
                self._record(exchange)
            self._lose()
            return
        if exchange is None:
            self._upstream = None  # an idle keep-alive connection closed: fine
            return
        if exchange.response_started:
            upstream.reader.feed_eof()
            self._relay_response(upstream)
            if self._exchange is exchange:
                # Cut off in the middle of a body: the client must not take
                # a truncated response for a whole one.
                self.metrics.upstream_error("reset")
                self._upstream = None
                self._record(exchange)
                self._exchange = None
                self.transport.abortConnection()
            return
        self._upstream = None
        if exchange.replayable and upstream.served and exchange.request_done:
            # The classic keep-alive race: the origin closed an idle connection
            # just as we reused it.  A request without a body is safe to resend.
            exchange.replayable = False
            self._use_upstream(upstream.destination)
            return
        self.metrics.upstream_error("reset")
        self._reject(502, "upstream closed the connection without answering", None)

    def _upstream_broke(self, upstream: Upstream, cause: str) -> None:
        exchange = self._exchange
        self._drop_upstream(upstream)
        log.info("{cause} (from {dest})", cause=cause, dest=upstream.destination)
        if exchange is not None and not exchange.response_started:
            self._reject(502, cause, None)
        else:
            if exchange is not None:
                self._record(exchange)
                self._exchange = None
            self.transport.abortConnection()

    def _drop_upstream(self, upstream: Upstream) -> None:
        if self._upstream is upstream:
            self._upstream = None
            if self.transport.producer is upstream.gate:
                self.transport.unregisterProducer()
        if not upstream.lost:
            upstream.transport.unregisterProducer()
            upstream.transport.loseConnection()
        # Reading from the client may have been paused by this upstream's
        # full send buffer; that reason is gone with it.
        self.gate.resume(BACKPRESSURE)

    # --- answers, timers, bookkeeping ------------------------------------------

    def _reject(self, status: int, text: str, reason: str | None) -> None:
        """Answer with an error made by the proxy, then close the connection."""
        exchange = self._exchange
        if reason is not None:
            self.metrics.rejected(reason)
            exchange_denied = reason in ("forbidden", "loop")
        else:
            exchange_denied = False
        if exchange is None:
            exchange = _Exchange(_NO_REQUEST, self._clock.seconds())
        exchange.status = status
        exchange.denied = exchange_denied
        if exchange.url == b"-":
            exchange.url = exchange.request.target
        self._exchange = None
        self._connecting = None
        if self._upstream is not None:
            self._drop_upstream(self._upstream)
        self._write(
            H.simple_response(status, REASON_PHRASES.get(status, b"Error"), text, close=True)
        )
        self._record(exchange)  # after the write: the access log counts its bytes
        self._linger()

    def _lose(self) -> None:
        self._uncork()
        self.transport.loseConnection()

    def _linger(self) -> None:
        self._uncork()
        self._discarding = True
        self._cancel_timer()
        self.gate.resume(PIPELINE)
        self.gate.resume(CONNECTING)
        self.transport.loseWriteConnection()
        self._arm("linger", _LINGER_SECONDS)

    def _record(self, exchange: _Exchange) -> None:
        now = self._clock.seconds()
        duration = now - exchange.started
        self.metrics.request(exchange.request.method, exchange.status, duration)
        access_log = self.factory.access_log
        if access_log is not None:
            access_log.log(self._access_entry(exchange, now, duration))
        self._flush_bytes()

    def _url(self, exchange: _Exchange) -> bytes:
        if exchange.target is None:  # CONNECT, or answered before routing
            target = exchange.url
            host = exchange.request.get(b"host") if exchange.request is not _NO_REQUEST else None
            if target.startswith(b"/") and host is not None:
                return b"http://" + host + target
            return target
        host = exchange.host or exchange.request.get(b"host")
        return _absolute_url(exchange.destination, exchange.target, host)

    def _access_entry(self, exchange: _Exchange, now: float, duration: float) -> AccessEntry:
        if exchange.denied:
            result = "TCP_DENIED"
        elif exchange.tunnel and exchange.status in (101, 200):
            result = "TCP_TUNNEL"
        elif exchange.status and exchange.response_started:
            result = "TCP_MISS"
        else:
            result = "NONE"  # answered by the proxy itself, or not at all
        destination = exchange.destination
        if destination is None or not exchange.response_started:
            where = None
        elif ":" in destination[0]:
            where = f"[{destination[0]}]:{destination[1]}"
        else:
            where = f"{destination[0]}:{destination[1]}"
        return AccessEntry(
            time=now,
            duration=duration,
            client=self.client_ip,
            port=self.port.name,
            mode=self.port.mode,
            method=exchange.request.method.decode("ascii", "replace"),
            url=self._url(exchange).decode("ascii", "replace"),
            status=exchange.status,
            bytes_out=self._bytes_out,
            bytes_in=self._bytes_in,
            destination=where,
            result=result,
            content_type=exchange.content_type.decode("ascii", "replace"),
        )

    def _flush_bytes(self) -> None:
        if self._bytes_in or self._bytes_out:
            self.metrics.transferred(self._bytes_in, self._bytes_out)
            self._bytes_in = 0
            self._bytes_out = 0

    def _write(self, data: bytes) -> None:
        self._bytes_out += len(data)
        if self._corked is not None:
            self._corked.append(data)
        else:
            self._writer.write(data)

    def _write_sequence(self, parts: list[bytes]) -> None:
        for part in parts:
            self._bytes_out += len(part)
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

    def _arm(self, kind: str, seconds: float) -> None:
        """
        The connection's one deadline: what expires (C{kind}) and when.  No
        timer object per connection: the factory's sweep looks at every
        connection a few times a second (see L{ProxyFactory.sweep}).
        """
        self._timer_kind = kind
        self._deadline = self._clock.seconds() + seconds

    def _cancel_timer(self) -> None:
        self._timer_kind = ""

    def check_deadline(self, now: float) -> None:
        if self._timer_kind and now >= self._deadline:
            self._timed_out()

    def _timed_out(self) -> None:
        kind = self._timer_kind
        timeouts = self.factory.settings.timeouts
        if kind == "linger":
            self.transport.abortConnection()
        elif kind == "idle":
            left = self._last_activity + timeouts.idle - self._clock.seconds()
            if left > 0:
                self._arm("idle", left)
                return
            log.info("closing {client}: no data either way for {s}s", client=self.client_ip,
                     s=timeouts.idle)  # fmt: skip
            self.metrics.rejected("timeout")
            if self._exchange is not None and not self._exchange.response_started:
                self._reject(504, f"no data for {timeouts.idle:g} seconds", None)
                return
            if self._exchange is not None:
                self._record(self._exchange)
                self._exchange = None
            self.transport.abortConnection()
        elif kind == "client_idle":
            self._lose()
        elif kind == "request_header":
            self.metrics.rejected("timeout")
            self._reject(
                408, f"request head not received within {timeouts.request_header:g} seconds", None
            )
        elif kind == "response":
            if self._upstream is not None:
                self.metrics.upstream_error("timeout")
            where = self._upstream.destination if self._upstream else self.destination
            self._reject(
                504,
                f"upstream {where[0]}:{where[1]} did not answer within {timeouts.response:g}"
                " seconds",
                None,
            )


class _NoRequest:
    method = b"-"
    target = b"-"
    version = b"HTTP/1.1"
    keep_alive = False
    body = "none"


_NO_REQUEST = _NoRequest()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _x_forwarded_for(fields, mode: str, client_ip: str):
    kept = [(n, v) for n, v in fields if n.lower() != b"x-forwarded-for"]
    if mode == "strip":
        return kept
    previous = [v for n, v in fields if n.lower() == b"x-forwarded-for"]
    value = b", ".join([*previous, client_ip.encode()])
    kept.append((b"X-Forwarded-For", value))
    return kept


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


def _absolute_url(destination: tuple[str, int], target: bytes, host: bytes | None) -> bytes:
    """The URL for the access log: Squid logs absolute URLs."""
    if target.startswith(b"/") or target == b"*":
        if host is None:
            ip, port = destination
            host = (f"[{ip}]" if ":" in ip else ip).encode()
            if port != 80:
                host += b":%d" % port
        return b"http://" + host + target
    return target


_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH)


def classify_connect_failure(exc: BaseException) -> tuple[int, str, str]:
    """(status to answer, cause for humans, metric reason) for a failed connect."""
    os_errno = getattr(exc, "osError", None)
    if isinstance(exc, neterror.ConnectBindError) or os_errno in SPOOF_ERRNOS:
        return 502, "could not use the client's address as source (spoofing failed)", "spoof"
    if isinstance(exc, neterror.ConnectionRefusedError) or os_errno == errno.ECONNREFUSED:
        return 502, "connection refused", "refused"
    if isinstance(exc, neterror.TimeoutError | neterror.TCPTimedOutError):
        return 504, "connect timed out", "timeout"
    if isinstance(exc, neterror.NoRouteError) or os_errno in _UNREACHABLE:
        return 502, "no route to host", "unreachable"
    return 502, str(exc) or type(exc).__name__, "unreachable"
