"""
One client connection as a sans-IO state machine: the request loop, the
upstream connection it is pinned to, timeouts, and every answer the proxy
makes itself.

The session never touches a socket, a timer or a metric.  It is fed events
(client bytes and EOF, upstream connected / failed / bytes / lost, L{tick}
with the time, drain) and acts through a L{SessionIO} that the Twisted
adapter in L{relay} implements.  Each finished exchange becomes one
L{ExchangeRecord}, handed to C{SessionIO.finished}; metrics and the access
log consume it there.

States (L{State}) and the one deadline armed in each (L{Deadline})::

    IDLE ──bytes──► HEAD ──head──► CONNECTING ──► SENDING ──► AWAITING ──► RESPONDING ─┐
     ▲ CLIENT_IDLE   REQUEST_HEADER  IDLE           IDLE        RESPONSE     IDLE         │
     └──────────────────────── keep-alive: next request ◄───────────────────────────────┘
    CONNECTING/SENDING/AWAITING ──101 or CONNECT──► TUNNEL (IDLE)
    RESPONDING ──the adapter splices the rest of a Content-Length body──► SPLICING (IDLE)
      ──all of it delivered──► as if read (IDLE for the next request, or CLOSING)
    any ──answer by the proxy──► LINGER (LINGER) ──► CLOSING (CLOSING) ──► CLOSED

CONNECTING also covers, on ports with C{auth}, the check of each request's
proxy credentials (L{Session.authenticated}) before its upstream is used or
made, and the adapter's resolve -> check of the destination before it
connects (a refusal comes back as L{Session.upstream_failed}: 403).

There is one way to fail an exchange (L{Session._fail}): answer it if
nothing of a response reached the client yet, otherwise abort the
connection, so that a client never takes a truncated response for a whole.
"""

from __future__ import annotations

import enum
import errno
from typing import Protocol

from twisted.internet import error as neterror
from twisted.logger import Logger

from ..config import Limits, PortConfig, Timeouts
from ..logthrottle import LogThrottle
from ..resolver import DestinationRefused
from ..sockets import SPOOF_ERRNOS
from . import headers as H
from . import policy
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
from .record import ExchangeRecord

__all__ = [
    "BACKPRESSURE",
    "CONNECTING_READS",
    "PIPELINE",
    "Deadline",
    "Session",
    "SessionConfig",
    "SessionIO",
    "State",
    "classify_connect_failure",
]

log = Logger()

REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}

_CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# A client that was answered with an error may still be sending its body;
# closing at once would reset the connection and could destroy the answer
# before the client reads it (nginx's "lingering close").
LINGER_SECONDS = 2.0
# Bodies larger than this (or of unknown length) are read in larger pieces.
LARGE_BODY = 1 << 20
#: The field added to the last response on a connection that closes after it.
_CONNECTION_CLOSE = (b"Connection", b"close")
# Bytes a client may send ahead while its upstream connection is being made.
CONNECTING_BUFFER = 65536

# Why reading from the client is paused (bits of the adapter's ReadGate mask).
BACKPRESSURE = 1  # the upstream's send buffer is full
CONNECTING_READS = 2  # waiting for the upstream connection with enough buffered
PIPELINE = 4  # a pipelined request waits for the current answer


# IntEnum rather than Enum: the hot path tests set membership, and Enum's
# __hash__ is a Python-level call.
class State(enum.IntEnum):
    """Where a client connection is; see the module docstring for the transitions."""

    IDLE = 1  # between requests, nothing buffered
    HEAD = 2  # part of a request head arrived
    CONNECTING = 3  # the upstream connection is being made
    SENDING = 4  # the head went upstream; the request body is still arriving
    AWAITING = 5  # the whole request went upstream; no response yet
    RESPONDING = 6  # a response is being relayed to the client
    TUNNEL = 7  # CONNECT or an upgrade: bytes both ways
    LINGER = 8  # answered by the proxy: input is read and dropped, then close
    CLOSING = 9  # the connection closes once what was written is sent
    CLOSED = 10  # gone (or aborted): nothing more is written
    SPLICING = 11  # the adapter relays the rest of a response body itself (splice(2))


class Deadline(enum.IntEnum):
    """What the one deadline of a session bounds."""

    CLIENT_IDLE = 1  # a keep-alive connection's next request
    REQUEST_HEADER = 2  # the rest of a request head
    IDLE = 3  # no bytes either way while connecting, sending, relaying or tunnelling
    RESPONSE = 4  # the whole request was sent: the response's first bytes
    LINGER = 5  # lingering close
    CLOSING = 6  # a client that does not read what is left


# Members as module globals: the hot path reads them several times per request,
# and an Enum class attribute costs about three times a global.
_IDLE = State.IDLE
_HEAD = State.HEAD
_CONNECTING = State.CONNECTING
_SENDING = State.SENDING
_AWAITING = State.AWAITING
_RESPONDING = State.RESPONDING
_TUNNEL = State.TUNNEL
_LINGER = State.LINGER
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED
_SPLICING = State.SPLICING
_DL_CLIENT_IDLE = Deadline.CLIENT_IDLE
_DL_REQUEST_HEADER = Deadline.REQUEST_HEADER
_DL_IDLE = Deadline.IDLE
_DL_RESPONSE = Deadline.RESPONSE
_DL_LINGER = Deadline.LINGER
_DL_CLOSING = Deadline.CLOSING

# Refusals by policy, logged as Squid's TCP_DENIED.
_DENIED = frozenset({"forbidden", "loop", "destination", "auth"})

# States that read request events from the client's reader.
_READING = frozenset({_IDLE, _HEAD, _SENDING, _AWAITING, _RESPONDING})
_GONE = frozenset({_LINGER, _CLOSING, _CLOSED})


class SessionIO(Protocol):
    """What a session asks of its transport adapter."""

    def write(self, data: bytes) -> None:
        """Send to the client."""

    def write_sequence(self, parts: list[bytes]) -> None:
        """Send several pieces to the client."""

    def close(self) -> None:
        """Close the client connection once what was written is sent."""

    def abort(self) -> None:
        """Close the client connection now, dropping what is unsent."""

    def shutdown_write(self) -> None:
        """Close the sending side to the client; keep reading (lingering close)."""

    def pause(self, reason: int) -> None:
        """Stop reading from the client for C{reason} (L{PIPELINE}, L{CONNECTING_READS})."""

    def resume(self, reason: int) -> None:
        """C{reason} no longer holds reading from the client back."""

    def connect(self, link: object, destination: tuple[str, int], source_ip: str | None) -> None:
        """
        Open an upstream connection; its events name C{link}.  The adapter
        resolves a name and checks the destination first (resolve -> check ->
        connect, L{tproxy_twist.resolver}); a refusal comes back as
        C{upstream_failed(link, DestinationRefused)}.
        """

    def authenticate(self, link: object, client_ip: str, credentials: bytes | None) -> None:
        """
        Check a request's C{Proxy-Authorization} (C{None}: none); answer with
        L{Session.authenticated}C{(link, result)}, now or later.
        """

    def attach(self, link: object) -> None:
        """The session adopted the connected upstream C{link}: couple backpressure."""

    def upstream_write(self, link: object, data: bytes) -> None: ...

    def upstream_write_sequence(self, link: object, parts: list[bytes]) -> None: ...

    def upstream_close(self, link: object) -> None:
        """Let go of the upstream connection (closed gracefully)."""

    def upstream_abort(self, link: object) -> None: ...

    def upstream_shutdown_write(self, link: object) -> None: ...

    def large_reads(self, link: object | None, large: bool) -> None:
        """Read in larger pieces (a large body flows) or back to the default."""

    def finished(self, record: ExchangeRecord) -> None:
        """An exchange ended; count it and log it."""


class SessionConfig:
    """What every session of one port shares."""

    __slots__ = (
        "port",
        "mode",
        "timeouts",
        "limits",
        "via_marker",
        "throttle",
        "local_addresses",
        "authenticates",
        "via11",
        "_via",
        "_via_on",
        "_pseudonym",
    )

    def __init__(
        self,
        port: PortConfig,
        timeouts: Timeouts,
        limits: Limits,
        pseudonym: str,
        throttle: LogThrottle,
        local_addresses=frozenset(),
    ) -> None:
        self.port = port
        self.mode = port.mode
        self.timeouts = timeouts
        self.limits = limits
        self._pseudonym = pseudonym
        # What our own Via entries contain; seeing it on a request means a loop.
        self.via_marker = f"{pseudonym} (tproxy-twist)".encode()
        self.throttle = throttle
        self.local_addresses = local_addresses
        self.authenticates = port.auth is not None  # every request needs proxy credentials
        self._via: dict[bytes, bytes] = {}
        self._via_on = port.via
        # via(b"HTTP/1.1"), read without a call for the usual messages.
        self.via11 = self.via(b"HTTP/1.1")

    def via(self, version: bytes) -> bytes | None:
        """Our Via entry for a message of C{version}, made once per version; C{None}: via off."""
        if not self._via_on:
            return None
        entry = self._via.get(version)
        if entry is None:
            entry = self._via[version] = H.via_value(version, self._pseudonym)
        return entry

    def request_reader(self) -> RequestReader:
        limits = self.limits
        return RequestReader(
            max_line=limits.max_request_line,
            max_head=limits.max_header_size,
            max_field_line=limits.max_header_size,
            max_fields=limits.max_header_fields,
            max_chunk_ext=limits.max_chunk_extensions,
        )

    def response_reader(self) -> ResponseReader:
        limits = self.limits
        return ResponseReader(
            max_line=limits.max_response_header_size,
            max_head=limits.max_response_header_size,
            max_field_line=limits.max_response_header_size,
            max_fields=limits.max_header_fields,
            max_chunk_ext=limits.max_chunk_extensions,
        )


class Link:
    """
    Names one upstream connection attempt (the adapter's events carry it), or
    one authentication check of a request (L{Session.authenticated}).
    """

    __slots__ = ("destination", "handle", "address")

    def __init__(self, destination: tuple[str, int]) -> None:
        self.destination = destination  # as routed: a name on forward ports
        self.handle: object = None  # the adapter's own (its protocol, once connected)
        self.address: str | None = None  # the checked IP literal connected to


class _Upstream:
    __slots__ = ("link", "destination", "reader", "served", "lost")

    def __init__(self, link: Link, reader: ResponseReader) -> None:
        self.link = link
        self.destination = link.destination
        self.reader = reader
        self.served = 0  # responses completed on this connection
        self.lost = False


class _Exchange(ExchangeRecord):
    """
    One request and its response, as the session tracks it: also its
    L{ExchangeRecord} (one object per exchange, not two), handed to
    C{SessionIO.finished} when it ends.
    """

    __slots__ = (
        "request",
        "head",
        "chunked_out",
        "request_done",
        "response_chunked",
        "close_client",
        "wants_tunnel",
        "connect_started",
        "replayable",
        "upstream_keep_alive",
        "large",
    )

    def __init__(self, request: Request, started: float, client: str) -> None:
        ExchangeRecord.__init__(self, started, client, request.method, request.target)
        self.request = request
        self.head = b""  # the serialized head sent upstream
        self.chunked_out = False  # request body re-chunked upstream
        self.request_done = False  # whole request received (and written upstream)
        self.response_chunked = False  # response body chunked to the client
        self.close_client = not request.keep_alive
        self.wants_tunnel = False  # CONNECT, or an upgrade the client asked for
        self.connect_started = 0.0
        self.replayable = False  # may be resent once on a fresh connection
        self.upstream_keep_alive = True
        self.large = False  # reads were made larger for a large body


class Session:
    """One client connection (see the module docstring)."""

    __slots__ = (
        "_body_left",
        "_bytes_in",
        "_bytes_out",
        "_clock",
        "_config",
        "_connecting",
        "_client_eof",
        "_draining",
        "_exchange",
        "_host_agreed",
        "_admitting",
        "_io",
        "_last_activity",
        "_pipeline_paused",
        "_reader",
        "_refusal",
        "_up",
        "client_ip",
        "deadline_at",
        "deadline_kind",
        "destination",
        "server_name",
        "state",
    )

    def __init__(
        self,
        config: SessionConfig,
        io: SessionIO,
        clock,
        client_ip: str,
        destination: tuple[str, int] | None,
        refusal: policy.Refusal | None = None,
        server_name: str | None = None,
    ) -> None:
        self._config = config
        self._io = io
        self._clock = clock
        self.client_ip = client_ip
        self.destination = destination  # the original destination (None on forward ports)
        # A bumped connection: the name its origin was verified for (the SNI,
        # or the destination's address); requests must name it (see _host_agrees).
        self.server_name = server_name
        self._refusal = refusal
        self._reader = config.request_reader()
        self._exchange: _Exchange | None = None
        self._up: _Upstream | None = None
        self._connecting: Link | None = None
        self._host_agreed: bytes | None = None
        self._admitting: Link | None = None  # an authentication check answered synchronously
        self._body_left = 0  # bytes a request body may still have under max_body_size
        self._bytes_in = 0
        self._bytes_out = 0
        self._client_eof = False
        self._draining = False
        self._pipeline_paused = False
        self._last_activity = clock.seconds()
        self.state = _IDLE
        self.deadline_kind: Deadline | None = None
        self.deadline_at = 0.0
        self._arm(_DL_CLIENT_IDLE, config.timeouts.client_idle)

    # --- what the adapter asks ----------------------------------------------------

    @property
    def deadline(self) -> tuple[Deadline, float] | None:
        """The armed deadline: (what expires, when), or C{None}."""
        kind = self.deadline_kind
        return None if kind is None else (kind, self.deadline_at)

    @property
    def draining(self) -> bool:
        return self._draining

    def unrecorded_bytes(self) -> tuple[int, int]:
        """Bytes in and out that no record counted yet (they are forgotten here)."""
        counts = (self._bytes_in, self._bytes_out)
        self._bytes_in = self._bytes_out = 0
        return counts

    # --- client events --------------------------------------------------------------

    def turn_away(self, response: bytes) -> None:
        """Refuse the whole connection with C{response} (no exchange, no record)."""
        self._write(response)
        self._linger()

    def client_data(self, data: bytes) -> None:
        self._bytes_in += len(data)
        # The time, read once for everything this event does.
        now = self._last_activity = self._clock.seconds()
        state = self.state
        if state is _TUNNEL:
            up = self._up
            if up is not None and not up.lost:
                self._io.upstream_write(up.link, data)
            return
        if state in _GONE:
            return
        reader = self._reader
        reader.feed(data)
        if state is _CONNECTING:
            if reader.buffered > CONNECTING_BUFFER:
                self._io.pause(CONNECTING_READS)
            return
        self._process(now)
        if self.state is _IDLE and not reader.idle:
            # Part of a head came; a whole one would have started an exchange.
            self._to_head()

    def client_eof(self) -> None:
        """The client shut its sending side: answer what it sent, then close."""
        if self._client_eof:
            return
        self._client_eof = True
        state = self.state
        if state is _TUNNEL:
            if self._up is not None and not self._up.lost:
                self._io.upstream_shutdown_write(self._up.link)
            return
        if state is _LINGER:
            self._close()
            return
        if state in _GONE:
            return
        self._reader.feed_eof()
        if state is not _CONNECTING:
            self._process()

    def client_lost(self) -> None:
        """The client connection is gone (closed, reset or aborted)."""
        self.state = _CLOSED
        self.deadline_kind = None
        self._connecting = None
        exchange = self._exchange
        if exchange is not None:
            # A tunnel ends, or the client left before its answer was complete
            # (status 0 then, Squid's "000").
            self._exchange = None
            record = exchange
            if record.response_started and not record.tunnel:
                record.incomplete = "client"
            self._record(exchange)
        up = self._up
        self._up = None
        if up is not None and not up.lost:
            self._io.upstream_abort(up.link)

    def drain(self, min_idle: float) -> None:
        """Finish: close after the current response, or now if idle long enough."""
        self._draining = True
        if (
            self.state is _IDLE
            and self._reader.idle
            and self._clock.seconds() - self._last_activity >= min_idle
        ):
            # Idle for a while: no request is likely to be on its way, so
            # closing cannot race with one (a client would see a reset).
            self._close()

    def abort(self, reason: str) -> None:
        """
        End the connection now (C{reason}: C{drain} for the drain timeout).
        Whatever was in progress is recorded as incomplete.
        """
        if self.state is _CLOSED:
            return
        exchange = self._exchange
        if exchange is None and self.state is _HEAD:
            exchange = self._new_exchange(None)
        if exchange is not None:
            self._exchange = None
            exchange.incomplete = reason
            self._record(exchange)
        self._abort()

    def tick(self, now: float) -> None:
        """Time passed: let the deadline expire if it is due."""
        kind = self.deadline_kind
        if kind is None or now < self.deadline_at:
            return
        self.deadline_kind = None
        timeouts = self._config.timeouts
        if kind is _DL_LINGER or kind is _DL_CLOSING:
            self._abort()
        elif kind is _DL_CLIENT_IDLE:
            self._close()
        elif kind is _DL_IDLE:
            left = self._last_activity + timeouts.idle - now
            if left > 0:
                self._arm(_DL_IDLE, left)
                return
            self._config.throttle.emit(
                log.info, "idle-timeout", "closing {client}: no data either way for {s}s",
                client=self.client_ip, s=timeouts.idle,
            )  # fmt: skip
            exchange = self._exchange
            if exchange is not None:
                exchange.rejected = "timeout"
            self._fail(504, f"no data for {timeouts.idle:g} seconds", incomplete="timeout")
        elif kind is _DL_REQUEST_HEADER:
            self._answer(
                408,
                f"request head not received within {timeouts.request_header:g} seconds",
                rejected="timeout",
            )
        elif kind is _DL_RESPONSE:
            exchange = self._exchange
            where = None
            if exchange is not None:
                where = exchange.destination
                if self._up is not None:
                    exchange.upstream_error = "timeout"
            where = where or self.destination or ("-", 0)
            self._answer(
                504,
                f"upstream {where[0]}:{where[1]} did not answer within {timeouts.response:g}"
                " seconds",
            )

    # --- zero-copy bodies: the adapter relays a Content-Length body itself -------------
    #
    # RESPONDING ─ body_to_splice() > 0, splicing_body() ─► SPLICING: the adapter moves
    # the rest of the body from the upstream to the client (splice(2)) and reads neither
    # connection meanwhile; relayed() counts what it moved and keeps the idle deadline
    # away.  SPLICING ─ body_spliced() ─► the response ends as if its body had been read;
    # SPLICING ─ body_splice_failed() ─► aborted and recorded as incomplete.  Timeouts,
    # drain, abort and client_lost work in SPLICING as they do in RESPONDING.

    def body_to_splice(self) -> int:
        """
        How many bytes of the response being relayed the adapter may move from
        the upstream to the client itself, or 0.  Non-zero only while
        RESPONDING a body with a Content-Length, once its head and every body
        byte read so far went to the client, the whole request was received,
        and at least C{[limits] splice_body_min} bytes are still to come.
        Asking changes nothing; L{splicing_body} takes the offer.
        """
        if self.state is not _RESPONDING:
            return 0
        minimum = self._config.limits.splice_body_min
        exchange = self._exchange
        if not minimum or exchange is None or not exchange.request_done:
            return 0
        reader = self._up.reader
        if reader.buffered:
            return 0
        left = reader.body_unread
        return left if left >= minimum else 0

    def splicing_body(self) -> None:
        """The adapter relays the L{body_to_splice} bytes from now on (RESPONDING → SPLICING)."""
        if not self.body_to_splice():
            raise RuntimeError("splicing_body() without a body to splice")
        self.state = _SPLICING

    def relayed(self, n_in: int, n_out: int) -> None:
        """
        The adapter moved bytes itself (a spliced tunnel or body), C{n_in}
        from the client and C{n_out} to it: counted for the record, and
        activity that keeps the idle deadline away.
        """
        self._bytes_in += n_in
        self._bytes_out += n_out
        self._last_activity = self._clock.seconds()

    def body_spliced(self) -> None:
        """Every byte of the spliced body reached the client: the response ends as if read."""
        if self.state is not _SPLICING:
            return
        self.state = _RESPONDING
        reader = self._up.reader
        reader.skip_body(reader.body_unread)
        self._relay_response()

    def body_splice_failed(self, upstream: bool) -> None:
        """
        The spliced body broke off: C{upstream} when the origin closed early
        or failed (an upstream error, as a body cut off while copied), else
        the client went away.  The connection is aborted, the exchange
        recorded as incomplete.
        """
        if self.state is not _SPLICING:
            return
        self.state = _RESPONDING
        if upstream:
            self._exchange.upstream_error = "reset"
            self._fail(502, "upstream closed the connection", incomplete="upstream")
        else:
            self._fail(502, "the client went away", incomplete="client")

    # --- the request loop -------------------------------------------------------------

    def _process(self, now: float | None = None) -> None:
        """
        Handle the request events the reader has, until it needs something
        (C{now}: the time, if the caller read it).
        """
        reader = self._reader
        while self.state in _READING:
            try:
                event = reader.next_event()
            except ProtocolError as e:
                self._fail(e.status, e.reason, rejected="bad_request", incomplete="client")
                return
            kind = type(event)
            if kind is Data:
                self._send_body(event.data)
            elif kind is Request:
                self._start_request(event, now)
                exchange = self._exchange
                if exchange is not None and exchange.request_done and self.state in _READING:
                    # A bodiless request taken whole: next_event() would say
                    # PAUSED (handled here without the call).
                    if not reader.idle:
                        self._pipeline_paused = True
                        self._io.pause(PIPELINE)
                    return
            elif kind is EndOfMessage:
                self._request_body_done(event.trailers)
            elif event is NEED_DATA:
                return
            elif event is PAUSED:
                if not reader.idle:
                    # A pipelined request is already here: read no more until
                    # the current one is answered.
                    self._pipeline_paused = True
                    self._io.pause(PIPELINE)
                return
            elif event is CLOSED:
                if self._exchange is None:
                    self._close()
                return

    def _new_exchange(self, request: Request | None) -> _Exchange:
        now = self._clock.seconds()
        if request is None:
            request = _NO_REQUEST
        exchange = _Exchange(request, now, self.client_ip)
        if request is not _NO_REQUEST:
            exchange.request_host = request.get(b"host")
        return exchange

    def _start_request(self, request: Request, now: float | None = None) -> None:
        # The deadline is armed where the request leaves HEAD/IDLE: on its way
        # upstream (CONNECTING, SENDING, AWAITING) or answered by the proxy.
        config = self._config
        if now is None:
            now = self._clock.seconds()
        exchange = record = self._exchange = _Exchange(request, now, self.client_ip)
        record.request_host = request.get(b"host")
        refusal = self._refusal
        if refusal is not None:
            self._answer(refusal.status, refusal.reason, rejected=refusal.metric_reason)
            return
        # (A plain or trim head has no Via field: not a loop, and no search.)
        if not (request.plain or request.trim) and policy.is_loop(request, config.via_marker):
            self._answer(
                508, "forwarding loop: this request already passed through us", rejected="loop"
            )
            return
        port = config.port
        try:
            destination, target, host = policy.route(port, request, self.destination)
        except policy.Refusal as e:
            self._answer(e.status, e.reason, rejected=e.metric_reason)
            return
        except ProtocolError as e:
            self._answer(e.status, e.reason, rejected="bad_request")
            return
        max_body = config.limits.max_body_size
        if max_body:
            if request.body == "length" and request.content_length > max_body:
                self._answer(413, f"request body larger than {max_body} bytes", rejected="limit")
                return
            self._body_left = max_body
        if config.mode != "forward":
            named = host if host is not None else record.request_host
            # (Keep-alive requests repeat the Host that agreed: no call for them.)
            if named is not None and named != self._host_agreed and not self._host_agrees(named):
                return
        record.destination = destination
        if request.method == b"CONNECT":
            exchange.wants_tunnel = True
            self._admit(destination)
            return
        record.target = target
        record.host = host
        head = None
        if host is None and request.version == b"HTTP/1.1":
            # The common case: the head goes upstream as it came (perhaps without
            # its Connection field), plus Via.
            head = policy.forwarded_head(
                request, config.via11, port.x_forwarded_for, self.client_ip
            )
        if head is not None:
            self._forward_head(exchange, request, head, destination, now)
            return
        upgrade = policy.wants_upgrade(request)
        fields = policy.upstream_fields(
            request,
            host=host,
            upgrade=upgrade,
            via=config.via(request.version),
            xff_mode=port.x_forwarded_for,
            client_ip=self.client_ip,
        )
        if request.body == "chunked":
            fields.append((b"Transfer-Encoding", b"chunked"))
            exchange.chunked_out = True
            try:
                # A bad first chunk-size line that came with the head is
                # answered before an upstream connection is made for it.
                self._reader.check_chunk_size_ahead()
            except ProtocolError as e:
                self._answer(e.status, e.reason, rejected="bad_request")
                return
        exchange.wants_tunnel = upgrade
        self._forward_head(
            exchange, request, H.serialize_request_head(request.method, target, fields), destination
        )

    def _forward_head(
        self,
        exchange: _Exchange,
        request: Request,
        head: bytes,
        destination: tuple[str, int],
        now: float | None = None,
    ) -> None:
        """Send C{head} (the request's head as it goes upstream) to C{destination}."""
        if request.body == "chunked" or (request.content_length or 0) > LARGE_BODY:
            exchange.large = True
            self._io.large_reads(None, True)  # a large upload: larger reads
        exchange.head = head
        if request.body == "none":
            exchange.replayable = True
            # No EndOfMessage event to wait for: the whole request is here.
            exchange.request_done = self._reader.take_end()
        if not self._config.authenticates:
            up = self._up
            if up is not None and not up.lost and up.destination == destination:
                self._send_head(now)  # _admit's and _use_upstream's way for a reused upstream
                return
        self._admit(destination)

    def _admit(self, destination: tuple[str, int]) -> None:
        """
        On ports with C{auth}, every request's credentials are checked (off
        this thread, so the session waits in CONNECTING, reading no further)
        before its upstream connection is used or made.
        """
        config = self._config
        if not config.authenticates:
            up = self._up
            if up is None or up.lost or up.destination != destination:
                # CONNECTING (a reused upstream gets SENDING's or AWAITING's deadline).
                self._arm(_DL_IDLE, config.timeouts.idle)
            self._use_upstream(destination)
            return
        self.state = _CONNECTING
        self._arm(_DL_IDLE, config.timeouts.idle)
        link = self._connecting = self._admitting = Link(destination)
        self._io.authenticate(
            link, self.client_ip, self._exchange.request.get(b"proxy-authorization")
        )
        if self._admitting is link:
            self._admitting = None  # the answer comes later

    def authenticated(self, link: Link, result) -> None:
        """
        The answer to C{authenticate(link, …)}: C{result.ok} and C{result.user},
        or C{result.status} (407, 429, 503), C{reason}, C{metric} and
        C{fields} to answer with (L{tproxy_twist.auth.AuthResult}).
        """
        if link is not self._connecting:
            return  # the session moved on (answered, aborted, closed)
        synchronous = self._admitting is link
        self._admitting = None
        self._connecting = None
        self._io.resume(CONNECTING_READS)
        if not result.ok:
            self._answer(result.status, result.reason, rejected=result.metric,
                         extra=result.fields)  # fmt: skip
            return
        self._exchange.user = result.user
        self._use_upstream(link.destination)
        if not synchronous:
            # Inside _process the loop goes on by itself; later, start it again.
            self._process()

    def _host_agrees(self, named: bytes) -> bool:
        """
        On intercepting ports the original destination decides where we
        connect; the authority really sent upstream (an absolute-form
        target's, or Host) naming another IP address or port is counted and
        logged, and refused with 409 under host_verify_strict (as Squid's
        host_verify_strict).  An invalid authority is a 400.  On a bumped
        connection the authority must name the server the origin was verified
        for, or it is 421 Misdirected Request (RFC 9110, 15.5.20).
        """
        server_name = self.server_name
        try:
            if server_name is None:
                agrees = policy.host_agrees(named, self.destination)
            else:
                agrees = policy.host_names_server(named, server_name, self.destination)
        except ProtocolError as e:
            self._answer(400, f"invalid Host {_text(named)}: {e.reason}", rejected="bad_request")
            return False
        if agrees:
            self._host_agreed = named  # keep-alive requests repeat their Host
            return True
        self._exchange.host_mismatch = True
        dest_host, dest_port = self.destination
        self._config.throttle.emit(
            log.info,
            "host-mismatch",
            "Host {named} does not match the original destination {dest} (client {client})",
            named=_text(named),
            dest=f"{dest_host}:{dest_port}",
            client=self.client_ip,
        )
        if not self._config.port.host_verify_strict:
            return True
        if server_name is not None:
            self._answer(
                421,
                f"Host {_text(named)} is not {server_name}, the server this TLS connection"
                " was made to",
                rejected="forbidden",
            )
            return False
        self._answer(
            409,
            f"Host {_text(named)} does not match the destination"
            f" this connection was made to ({dest_host}:{dest_port})",
            rejected="forbidden",
        )
        return False

    def _use_upstream(self, destination: tuple[str, int]) -> None:
        up = self._up
        if up is not None and up.destination == destination and not up.lost:
            self._send_head()
            return
        if up is not None:
            self._drop_upstream()
        self.state = _CONNECTING
        # Reading goes on while connecting (pausing and resuming costs two
        # epoll_ctl calls per connection); what arrives waits in the reader,
        # and client_data pauses once that is more than a socket read.
        link = self._connecting = Link(destination)
        self._exchange.connect_started = self._clock.seconds()
        spoof = self.client_ip if self._config.port.spoof_client_ip else None
        self._io.connect(link, destination, spoof)

    def _send_head(self, now: float | None = None) -> None:
        exchange = self._exchange
        up = self._up
        if exchange.request.method == b"CONNECT":
            self._write(_CONNECT_ESTABLISHED)
            record = exchange
            record.status = 200
            record.response_started = True
            self._become_tunnel()
            return
        up.reader.expect(exchange.request.method)
        self._io.upstream_write(up.link, exchange.head)
        if exchange.request_done:  # a bodiless request, or one replayed on a fresh connection
            self.state = _AWAITING
            self._arm(_DL_RESPONSE, self._config.timeouts.response, now)
        else:
            self.state = _SENDING
            self._arm(_DL_IDLE, self._config.timeouts.idle, now)

    def _to_head(self) -> None:
        self.state = _HEAD
        self._arm(_DL_REQUEST_HEADER, self._config.timeouts.request_header)

    def _send_body(self, data: bytes) -> None:
        if self._body_left:
            self._body_left -= len(data)
            if self._body_left < 0:  # a chunked body grew past max_body_size
                limit = self._config.limits.max_body_size
                self._fail(413, f"request body larger than {limit} bytes", rejected="limit",
                           incomplete="client")  # fmt: skip
                return
        up = self._up
        if up is None or up.lost:
            return
        if self._exchange.chunked_out:
            self._io.upstream_write_sequence(up.link, H.encode_chunk(data))
        else:
            self._io.upstream_write(up.link, data)

    def _request_body_done(self, trailers) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.request_done = True
        up = self._up
        if exchange.chunked_out and up is not None and not up.lost:
            self._io.upstream_write(up.link, H.last_chunk(H.forwardable_trailers(trailers)))
        if self.state is _SENDING:
            self.state = _AWAITING
            self._arm(_DL_RESPONSE, self._config.timeouts.response)

    # --- upstream events --------------------------------------------------------------

    def upstream_connected(self, link: Link) -> None:
        if link is not self._connecting:
            self._io.upstream_abort(link)
            return
        self._connecting = None
        exchange = self._exchange
        exchange.connect_duration = self._clock.seconds() - exchange.connect_started
        if link.address is not None:  # a resolved name: log the address really used
            exchange.destination = (link.address, link.destination[1])
        self._up = _Upstream(link, self._config.response_reader())
        self._io.attach(link)
        self._io.resume(CONNECTING_READS)
        self._send_head()
        self._process()

    def upstream_failed(self, link: Link, exc: BaseException) -> None:
        if link is not self._connecting:
            return
        self._connecting = None
        self._io.resume(CONNECTING_READS)
        if isinstance(exc, DestinationRefused):
            self._config.throttle.emit(
                log.info, "destination-refused", "refusing a request from {client}: {reason}",
                client=self.client_ip, reason=exc.decision.reason,
            )  # fmt: skip
            self._answer(403, f"destination refused: {exc.decision.reason}", rejected="destination")
            return
        status, cause, label = classify_connect_failure(exc)
        destination = link.destination
        where = f"{destination[0]}:{destination[1]}"
        throttle = self._config.throttle
        if label == "spoof":
            throttle.emit(
                log.error,
                "upstream-spoof",
                "cannot connect to {dest} from client address {client} (errno {errno}: {error})."
                " Likely causes: the proxy lacks CAP_NET_ADMIN/CAP_NET_RAW, or this port"
                " receives traffic that was not TPROXY-diverted, or replies to the client"
                " address are not routed back to this host (ip rule fwmark + local route).",
                dest=where,
                client=self.client_ip,
                errno=getattr(exc, "osError", None) or "?",
                error=cause,
            )
        elif label == "no_descriptors":
            throttle.emit(
                log.error,
                "upstream-no_descriptors",
                "cannot open a connection to {dest}: out of file descriptors (errno {errno})."
                " Raise the open-files limit (LimitNOFILE) or lower max_connections.",
                dest=where,
                errno=getattr(exc, "osError", None) or "?",
            )
        else:
            throttle.emit(
                log.info, "upstream-" + label, "upstream {dest} failed: {cause}",
                dest=where, cause=cause,
            )  # fmt: skip
        self._exchange.upstream_error = label
        self._answer(status, f"cannot connect to {where}: {cause}")

    def upstream_data(self, link: Link, data: bytes) -> None:
        up = self._up
        if up is None or up.link is not link:
            return
        now = self._last_activity = self._clock.seconds()
        if self.state is _TUNNEL:
            self._write(data)
            return
        if self._exchange is None:
            # An idle keep-alive upstream must not speak: nothing to answer,
            # and what it said must never be read as the next response.
            self._drop_upstream()
            return
        up.reader.feed(data)
        self._relay_response(now)

    def upstream_lost(self, link: Link) -> None:
        up = self._up
        if up is None or up.link is not link:
            return
        up.lost = True
        exchange = self._exchange
        if self.state is _TUNNEL:
            self._up = None
            if exchange is not None:
                self._exchange = None
                self._record(exchange)
            self._close()
            return
        if exchange is None:
            self._up = None  # an idle keep-alive connection closed: fine
            return
        if exchange.response_started:
            up.reader.feed_eof()
            self._relay_response()
            if self._exchange is exchange:
                # Cut off in the middle of a body: the client must not take
                # a truncated response for a whole one.
                exchange.upstream_error = "reset"
                self._fail(502, "upstream closed the connection", incomplete="upstream")
            return
        self._up = None
        if exchange.replayable and up.served and exchange.request_done:
            # The classic keep-alive race: the origin closed an idle connection
            # just as we reused it.  A request without a body is safe to resend.
            exchange.replayable = False
            self._use_upstream(up.destination)
            return
        exchange.upstream_error = "reset"
        self._fail(502, "upstream closed the connection without answering")

    def _relay_response(self, now: float | None = None) -> None:
        up = self._up
        reader = up.reader
        while self._up is up and self._exchange is not None:
            exchange = self._exchange
            try:
                event = reader.next_event()
            except ProtocolError as e:
                if up.lost:  # cut off mid-message
                    exchange.upstream_error = "reset"
                    cause = f"upstream closed the connection: {e.reason}"
                else:
                    exchange.upstream_error = "bad_response"
                    cause = f"invalid response from upstream: {e.reason}"
                self._upstream_broke(cause)
                return
            kind = type(event)
            if kind is Data:
                if exchange.response_chunked:
                    self._write_sequence(H.encode_chunk(event.data))
                else:
                    self._write(event.data)
                    if reader.take_end():  # all of a Content-Length body: no event to wait for
                        self._response_ended(up, now)
            elif kind is Response:
                if event.status < 200 and event.body != "tunnel":  # 1xx interim (not 101)
                    if exchange.request.version == b"HTTP/1.1":
                        fields = H.strip_hop_by_hop(event.headers)
                        self._write(H.serialize_response_head(event.status, event.reason, fields))
                    continue
                if self._relay_response_head(exchange, event, reader):
                    self._response_ended(up, now)
            elif kind is EndOfMessage:
                if not exchange.response_started:  # the end of a 1xx interim response
                    reader.start_next()
                    continue
                if exchange.response_chunked:
                    self._write(H.last_chunk(event.trailers))
                self._response_ended(up, now)
            else:  # NEED_DATA, PAUSED (after a tunnel head) or CLOSED
                break
        if self.state is _RESPONDING and self.deadline_kind is not _DL_IDLE:
            self._arm(_DL_IDLE, self._config.timeouts.idle, now)

    def _relay_response_head(
        self, exchange: _Exchange, response: Response, reader: ResponseReader
    ) -> bool:
        """
        Relay a final response's head; True when the response ended with it
        (no body, or all of a Content-Length body was read with the head and
        went out with it), for the caller to end the exchange.
        """
        tunnel = response.body == "tunnel"
        if tunnel and not exchange.wants_tunnel:
            # 101 to a request that did not ask to upgrade: nothing sane
            # follows, and none of it may reach the client.
            exchange.upstream_error = "bad_response"
            self._upstream_broke("upstream switched protocols unasked")
            return False
        record = exchange
        record.response_started = True
        record.status = response.status
        record.response = response  # (its Content-Type is looked up if the access log asks)
        exchange.upstream_keep_alive = response.keep_alive and not exchange.wants_tunnel
        # RESPONDING's deadline (IDLE) is armed when _relay_response returns
        # with the response unfinished: most end in the same read.
        self.state = _RESPONDING
        body = response.body
        if body != "none" and (
            response.content_length is None or response.content_length > LARGE_BODY
        ):
            # A large body: fewer, larger reads; back to the default when the
            # exchange ends.
            self._io.large_reads(self._up.link, True)
            exchange.large = True
        http11 = exchange.request.version == b"HTTP/1.1"
        added = []  # fields we add after those received
        if body == "chunked" or body == "close":
            if http11:
                # Chunked to the client, so that its connection stays reusable.
                exchange.response_chunked = True
                added.append((b"Transfer-Encoding", b"chunked"))
            else:
                # An HTTP/1.0 client never gets chunked coding: the body goes
                # de-chunked, delimited by closing the connection.
                exchange.close_client = True
        if not exchange.request_done or self._draining:
            # An early answer while the request body is still arriving: the
            # rest of that body cannot be told apart from a next request.
            # Draining: this is the connection's last answer.
            exchange.close_client = True
        if exchange.close_client and not tunnel:
            added.append(_CONNECTION_CLOSE)
        elif not http11:
            added.append((b"Connection", b"keep-alive"))
        head = None
        if not tunnel and response.version == b"HTTP/1.1":
            if not added:
                # The common case: the head goes to the client as it came (perhaps
                # without its Connection field), plus Via.
                head = policy.forwarded_response_head(response, self._config.via11)
            elif len(added) == 1 and added[0] is _CONNECTION_CLOSE:
                # The same, the client's connection closing after it (Connection: close).
                head = policy.forwarded_response_head(response, self._config.via11, True)
        if head is None:
            via = self._config.via(response.version)
            fields = H.strip_hop_by_hop(response.headers, keep_upgrade=tunnel)
            fields += added
            if via is not None:
                fields = H.add_via(fields, via)
            head = H.serialize_response_head(response.status, response.reason, fields)
        if body == "length":
            rest = reader.take_body()
            if rest is not None:
                # The whole body came with the head: one write, no events for it.
                self._bytes_out += len(head) + len(rest)
                self._io.write_sequence([head, rest])
                return True
            self._write(head)
            return False
        self._write(head)
        if tunnel:
            self._become_tunnel()
            return False
        return body == "none" and reader.take_end()

    def _become_tunnel(self) -> None:
        self.state = _TUNNEL
        self._exchange.tunnel = True
        self._arm(_DL_IDLE, self._config.timeouts.idle)
        up = self._up
        pending = up.reader.take_buffered()
        if pending:
            self._write(pending)
        pending = self._reader.take_buffered()
        if pending:
            self._io.upstream_write(up.link, pending)
        self._resume_pipeline()
        if self._client_eof:
            self._io.upstream_shutdown_write(up.link)

    def _response_ended(self, up: _Upstream, now: float | None = None) -> None:
        """
        The response from C{up} ended, and with it the exchange (C{now}: the
        time, if the caller read it): record it, then the next request or close.
        """
        upstream_more = up.reader.start_next()
        up.served += 1
        exchange = self._exchange
        self._exchange = None
        if exchange.large:
            self._io.large_reads(up.link, False)
        # _record(exchange), inline (once per exchange), with the time already read.
        exchange.finished = self._clock.seconds() if now is None else now
        exchange.bytes_in = self._bytes_in
        exchange.bytes_out = self._bytes_out
        self._bytes_in = self._bytes_out = 0
        self._io.finished(exchange)
        if not exchange.upstream_keep_alive or upstream_more:
            # Bytes after a complete response, with no request outstanding:
            # the connection is not reused (they are never read as a response).
            self._drop_upstream()
        if exchange.close_client or not exchange.request_done:
            self._close()
            return
        reader = self._reader
        more = reader.start_next()
        self.state = _IDLE
        self._arm(_DL_CLIENT_IDLE, self._config.timeouts.client_idle, now)
        if self._pipeline_paused:
            self._resume_pipeline()
        if more or reader.eof:  # else the next event is NEED_DATA
            self._process(now)
            if self.state is _IDLE and not reader.idle:
                self._to_head()

    def _upstream_broke(self, cause: str) -> None:
        up = self._up
        self._drop_upstream()
        reason = self._exchange.upstream_error if self._exchange else None
        self._config.throttle.emit(
            log.info, f"upstream-{reason}", "{cause} (from {dest})", cause=cause,
            dest=up.destination,
        )  # fmt: skip
        self._fail(502, cause, incomplete="upstream")

    def _drop_upstream(self) -> None:
        up = self._up
        self._up = None
        if up is not None and not up.lost:
            self._io.upstream_close(up.link)

    # --- answers and endings ------------------------------------------------------------

    def _fail(
        self,
        status: int,
        text: str,
        *,
        rejected: str | None = None,
        incomplete: str = "upstream",
    ) -> None:
        """
        The one way an exchange fails: answered with C{status} if nothing of
        a response reached the client yet, otherwise the connection is
        aborted and the record says why it is C{incomplete}.
        """
        exchange = self._exchange
        if exchange is None or not exchange.response_started:
            self._answer(status, text, rejected=rejected)
            return
        record = exchange
        if rejected is not None:
            record.rejected = rejected
        if not record.tunnel:
            record.incomplete = incomplete
        self._exchange = None
        self._drop_upstream()
        self._record(exchange)
        self._abort()

    def _answer(
        self,
        status: int,
        text: str,
        *,
        rejected: str | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """
        Answer with an error made by the proxy (with the C{extra} fields),
        then close the connection (lingering).
        """
        exchange = self._exchange
        if exchange is None:
            exchange = self._new_exchange(None)
        self._exchange = None
        record = exchange
        record.status = status
        if rejected is not None:
            record.rejected = rejected
        record.denied = rejected in _DENIED
        if self._connecting is not None:
            self._connecting = None
            self._io.resume(CONNECTING_READS)
        self._drop_upstream()
        self._write(
            H.simple_response(
                status, REASON_PHRASES.get(status, b"Error"), text, close=True, extra=extra
            )
        )
        self._record(exchange)  # after the write: the record counts its bytes
        self._linger()

    def _resume_pipeline(self) -> None:
        if self._pipeline_paused:
            self._pipeline_paused = False
            self._io.resume(PIPELINE)

    def _linger(self) -> None:
        self.state = _LINGER
        io = self._io
        self._resume_pipeline()
        io.resume(CONNECTING_READS)
        if self._client_eof:
            self._close()
            return
        io.shutdown_write()
        self._arm(_DL_LINGER, LINGER_SECONDS)

    def _close(self) -> None:
        self.state = _CLOSING
        self._arm(_DL_CLOSING, self._config.timeouts.idle)
        self._io.close()

    def _abort(self) -> None:
        self.state = _CLOSED
        self.deadline_kind = None
        self._connecting = None  # a connection still being made is refused when it comes
        up = self._up
        self._up = None
        if up is not None and not up.lost:
            self._io.upstream_abort(up.link)
        self._io.abort()

    def _record(self, exchange: _Exchange) -> None:
        """The exchange ended: it counts the bytes since the last record, and is handed on."""
        exchange.finished = self._clock.seconds()
        exchange.bytes_in = self._bytes_in
        exchange.bytes_out = self._bytes_out
        self._bytes_in = self._bytes_out = 0
        self._io.finished(exchange)

    def _write(self, data: bytes) -> None:
        self._bytes_out += len(data)
        self._io.write(data)

    def _write_sequence(self, parts: list[bytes]) -> None:
        for part in parts:
            self._bytes_out += len(part)
        self._io.write_sequence(parts)

    def _arm(self, kind: Deadline, seconds: float, now: float | None = None) -> None:
        """
        The session's one deadline: what expires (C{kind}) and when.  No
        timer object per connection: the adapter calls L{tick} a few times a
        second.  C{now}: the time, if the caller read it for this event.
        """
        self.deadline_kind = kind
        self.deadline_at = (self._clock.seconds() if now is None else now) + seconds


class _NoRequest:
    """Stands for the request of an exchange that never had a whole one."""

    method = b"-"
    target = b"-"
    version = b"HTTP/1.1"
    keep_alive = False
    body = "none"

    def get(self, name: bytes) -> None:
        return None


_NO_REQUEST = _NoRequest()

_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH)
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def classify_connect_failure(exc: BaseException) -> tuple[int, str, str]:
    """(status to answer, cause for humans, metric reason) for a failed connect."""
    os_errno = getattr(exc, "osError", None)
    if os_errno is None and isinstance(exc, OSError):
        os_errno = exc.errno
    if os_errno in _NO_DESCRIPTORS:
        # socket() itself failed (Twisted reports it as a bind error): not spoofing.
        return 503, "the proxy is out of file descriptors", "no_descriptors"
    if isinstance(exc, neterror.ConnectBindError) or os_errno in SPOOF_ERRNOS:
        return 502, "could not use the client's address as source (spoofing failed)", "spoof"
    if isinstance(exc, neterror.ConnectionRefusedError) or os_errno == errno.ECONNREFUSED:
        return 502, "connection refused", "refused"
    if isinstance(exc, neterror.TimeoutError | neterror.TCPTimedOutError):
        return 504, "connect timed out", "timeout"
    if isinstance(exc, neterror.NoRouteError) or os_errno in _UNREACHABLE:
        return 502, "no route to host", "unreachable"
    if isinstance(exc, neterror.DNSLookupError):
        return 502, "the host name does not resolve", "unreachable"
    return 502, str(exc) or type(exc).__name__, "unreachable"


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")
