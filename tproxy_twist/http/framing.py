"""Sans-IO HTTP/1.1 message framing (RFC 9112), strict, for the relay's hot path.

The readers take bytes (``feed``/``feed_eof``) and hand back events
(``next_event``); they never touch a socket or Twisted.  Each reader parses one
direction of one connection:

* ``RequestReader``: what a client sends.  Errors carry 400, 413, 414, 431, 501
  or 505, the status the relay should answer with.
* ``ResponseReader``: what an upstream sends.  Every error carries 502.

Event sequence for one message::

    Request|Response, Data*, EndOfMessage, PAUSED... until start_next()

``NEED_DATA`` means "feed more bytes"; ``CLOSED`` means the peer closed
cleanly between messages.  A tunnel response (101, or 2xx to CONNECT) is
followed by ``PAUSED`` forever; the caller takes the bytes that followed the
head with ``take_buffered()``.

Choices a caller may rely on (all RFC 9112 "MAY reject" cases are rejected):

* Line endings must be CRLF.  A bare LF, or a bare CR, anywhere in a head, a
  chunk-size line or a trailer section is an error (400 / 502), for requests and
  responses alike; an LF-only peer is thus detected at its first line break.
* Empty lines (CRLF) before a request line or a status line are skipped, up to
  ``max_line`` bytes of them.
* obs-fold, whitespace between a field name and the colon, a field name that is
  not a token, and control characters other than HTAB (NUL, bare CR, DEL, ...)
  are rejected.
* A request with both Transfer-Encoding and Content-Length is rejected with 400
  rather than relayed with Content-Length removed: such a message is the classic
  request-smuggling vector, and no well-behaved client sends one.  A response
  with both is accepted (chunked wins), its Content-Length field is dropped from
  ``headers`` (RFC 9112 §6.3) and ``keep_alive`` is False.
* Repeated identical Content-Length values (``5, 5`` or two fields) are accepted
  and ``headers`` then holds a single ``Content-Length`` field, so the message can
  be forwarded unambiguously; differing values are rejected.
* Only ``chunked`` is understood as a transfer coding.  In requests: chunked not
  final -> 400, other codings -> 501, any Transfer-Encoding in HTTP/1.0 -> 400.
  In responses anything but exactly ``chunked`` -> 502 (the relay could not
  forward the coded content once the hop-by-hop Transfer-Encoding is removed).
* HTTP/1.1 requests must carry exactly one Host field; more than one Host field,
  or a Host value that is not ``host[:port]`` (a reg-name or a valid IPv6
  literal; a port of 1-65535 if given; a host if a port is given), is rejected
  in any version (RFC 9112 §3.2).  An empty Host is accepted.
* request-target must be in a form its method allows: origin-form (``/...``) or
  absolute-form (``scheme:...``) for most methods, authority-form
  (``host:port``) for CONNECT, and ``*`` only for OPTIONS (RFC 9112 §3.2).
* A start line is checked as soon as its CRLF arrives, before the rest of the
  head: a request line without an HTTP version (HTTP/0.9's ``GET /``) or any
  other invalid request line is answered at once (400, or 505 for another
  version) rather than left waiting for a CRLFCRLF that will never come.
* Limits: a start line over ``max_line`` -> 414; a field line over
  ``max_field_line`` (default: ``max_line``; the relay passes the head limit, so
  that only the whole head is bounded), a head (or trailer section) over
  ``max_head`` bytes or with more than ``max_fields`` fields -> 431; a
  Content-Length of more than 64 significant digits -> 413; a chunk size over 16
  hex digits or chunk extensions over ``max_chunk_ext`` bytes -> 400.  Responses
  use 502 for all of them.  Limits are enforced while data is still arriving,
  not only once a head is complete.
* Trailer fields are parsed and handed on in ``EndOfMessage.trailers`` as
  received; what may be forwarded is the relay's policy:
  ``headers.forwardable_trailers`` keeps only integrity checksums
  (Content-Digest, Repr-Digest, Digest, Content-MD5) and drops every field that
  could frame, route, authenticate or control the message (RFC 9110 §6.5.1).
* ``Expect: 100-continue`` is ignored in HTTP/1.0 requests (RFC 9110 §10.1.1).
* ``content_length`` is the Content-Length value only when it frames the body
  (``body`` is "length", or "none" for ``Content-Length: 0``); otherwise None.

Bodies are passed on as slices: when a body arrives in pieces that are entirely
body, each ``Data.data`` is the very bytes object given to ``feed``.
"""

from __future__ import annotations

import ipaddress
import re
from itertools import repeat
from typing import Final, NoReturn

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "PAUSED",
    "Data",
    "EndOfMessage",
    "Event",
    "Headers",
    "ProtocolError",
    "Request",
    "RequestReader",
    "Response",
    "ResponseReader",
]

Headers = list[tuple[bytes, bytes]]


class ProtocolError(Exception):
    """A message we will not relay.

    ``status`` is the HTTP status to answer with (400, 413, 414, 431, 501, 505
    for requests; 502 for a bad upstream response); ``reason`` is a short human
    sentence such as "conflicting Content-Length headers".
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
"""Feed more bytes before asking again."""
PAUSED: Final = _Sentinel("PAUSED")
"""A message ended (or became a tunnel); call start_next() for the next one."""
CLOSED: Final = _Sentinel("CLOSED")
"""The peer closed its sending side between messages: a clean close."""


class _Message:
    """What requests and responses share: their fields.

    A parsed head keeps its block (C{_block}: the start line and field lines
    as received) and its lowercased copy; the field list is built only when
    C{headers} is first read (the relay's common path never needs it), and
    L{get} / L{get_all} find a field in the block without building it.
    """

    __slots__ = ("_fields", "_block", "_low", "plain", "trim")

    _fields: Headers | None
    _block: bytes
    _low: bytes
    plain: bool
    trim: bool

    def without_connection_fields(self) -> bytes:
        """
        The head block without the lines of its Connection, Keep-Alive and
        Proxy-Connection fields (each with the CRLF before it): for a C{trim}
        message, what dropping the hop-by-hop fields leaves of it.
        """
        block = self._block
        low = self._low
        match = _CONNECTION_LINES.search(low)
        if match is None:
            return block
        end = match.end()
        following = _CONNECTION_LINES.search(low, end)
        if following is None:  # the usual one line (Connection: keep-alive)
            return block[: match.start()] + block[end:]
        parts = [block[: match.start()]]
        while following is not None:
            parts.append(block[end : following.start()])
            end = following.end()
            following = _CONNECTION_LINES.search(low, end)
        parts.append(block[end:])
        return b"".join(parts)

    @property
    def headers(self) -> Headers:
        """The fields, C{[(name, value), ...]}: names as received, values without
        surrounding whitespace."""
        fields = self._fields
        if fields is None:
            fields = self._fields = _field_list(self._block)
        return fields

    @headers.setter
    def headers(self, fields: Headers) -> None:
        self._fields = fields

    def get(self, name: bytes) -> bytes | None:
        """The first value of the field ``name`` (given in lowercase), or None."""
        if self._fields is None:
            # Field lines are "token:" right after a CRLF (the reader made sure).
            needle = _NEEDLES.get(name)
            if needle is None:
                needle = b"\r\n" + name + b":"
            i = self._low.find(needle)
            if i < 0:
                return None
            i += len(name) + 3
            block = self._block
            j = block.find(b"\r\n", i)
            return (block[i:j] if j >= 0 else block[i:]).strip(b" \t")
        size = len(name)
        for field, value in self._fields:
            if len(field) == size and field.lower() == name:
                return value
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (given in lowercase), in order."""
        if self._fields is None and self._low.find(b"\r\n" + name + b":") < 0:
            return []  # the usual answer, without building the field list
        size = len(name)
        return [v for f, v in self.headers if len(f) == size and f.lower() == name]


# What get() searches for the names the relay asks for on every exchange.
_NEEDLES: Final = {name: b"\r\n" + name + b":" for name in (b"host", b"content-type")}


def _field_list(block: bytes) -> Headers:
    """The fields of a checked head block (its start line and field lines)."""
    lines = block.split(b"\r\n")
    del lines[0]
    return [(n, v.strip(b" \t")) for n, _, v in map(bytes.partition, lines, _COLONS)]


class Request(_Message):
    """A parsed request head; ``body`` is "none", "length" or "chunked".

    ``head`` is the head as received (request line and field lines, without
    the final CRLFCRLF) when ``headers`` are exactly its field lines, or None
    when the reader changed them (repeated Content-Length values merged).
    ``plain`` is True when every field line is ``name: value`` (one space
    after the colon, no whitespace around the value, no HTAB anywhere in the
    head) and no field is one a proxy rewrites or drops (hop-by-hop fields,
    Via, X-Forwarded-For: see L{MANAGED_FIELDS}): what a head must be to be
    forwarded as received.  ``trim`` is True when it would be plain but for
    Connection, Keep-Alive or Proxy-Connection fields, the Connection fields
    naming no option but ``keep-alive`` and ``close`` and no field named
    Close in the head: dropping those lines
    (L{_Message.without_connection_fields}) is then all that removing the
    hop-by-hop fields does to it.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "keep_alive",
        "expect_continue",
        "body",
        "content_length",
        "head",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        keep_alive: bool,
        expect_continue: bool,
        body: str,
        content_length: int | None,
        head: bytes | None = None,
        block: bytes = b"",
        low: bytes = b"",
        plain: bool = False,
        trim: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self._fields = headers
        self._block = block
        self._low = low
        self.plain = plain
        self.trim = trim
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body = body
        self.content_length = content_length
        self.head = head

    def __repr__(self) -> str:
        return (
            f"<Request {self.method!r} {self.target!r} {self.version!r} body={self.body}"
            f" content_length={self.content_length} keep_alive={self.keep_alive}>"
        )


class Response(_Message):
    """A parsed response head.

    ``body`` is "none", "length", "chunked", "close" (read until the connection
    closes) or "tunnel" (everything after the head is raw tunnel bytes).
    ``head``, ``plain`` and ``trim`` as for L{Request}.
    """

    __slots__ = ("version", "status", "reason", "keep_alive", "body", "content_length", "head")

    def __init__(
        self,
        version: bytes,
        status: int,
        reason: bytes,
        headers: Headers,
        keep_alive: bool,
        body: str,
        content_length: int | None,
        head: bytes | None = None,
        block: bytes = b"",
        low: bytes = b"",
        plain: bool = False,
        trim: bool = False,
    ) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self._fields = headers
        self._block = block
        self._low = low
        self.plain = plain
        self.trim = trim
        self.keep_alive = keep_alive
        self.body = body
        self.content_length = content_length
        self.head = head  # as received, while headers are its field lines (see Request)

    @property
    def interim(self) -> bool:
        """True for a 1xx response other than 101: the final response is still to come."""
        return 100 <= self.status < 200 and self.status != 101

    def __repr__(self) -> str:
        return (
            f"<Response {self.version!r} {self.status} {self.reason!r} body={self.body}"
            f" content_length={self.content_length} keep_alive={self.keep_alive}>"
        )


class Data:
    """A piece of body, decoded (chunk framing removed)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return type(other) is Data and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"Data({self.data!r})"


class EndOfMessage:
    """The message is complete; ``trailers`` holds the trailer fields, if any."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: Headers | None = None) -> None:
        self.trailers: Headers = [] if trailers is None else trailers

    def __eq__(self, other: object) -> bool:
        return type(other) is EndOfMessage and other.trailers == self.trailers

    __hash__ = None  # type: ignore[assignment]  # mutable trailers

    def __repr__(self) -> str:
        return f"EndOfMessage({self.trailers!r})"


Event = Request | Response | Data | EndOfMessage | _Sentinel

# --- character classes -----------------------------------------------------------

_TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEXDIG: Final = b"0123456789abcdefABCDEF"
# Methods known to be tokens: a set lookup instead of checking every byte.
_COMMON_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"}
)
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*:")
_AUTHORITY: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[^:/?#@\[\]]+):[0-9]+")
# RFC 9110 §7.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal or a reg-name.
_HOST: Final = re.compile(
    rb"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::([0-9]*))?"
)
# A reg-name without percent-escapes and without a port: valid as it is.
_PLAIN_HOST: Final = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=]+")
_plain_host: Final = _PLAIN_HOST.fullmatch
_TOKEN_RE: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT_VALUE: Final = rb"(?:" + _TOKEN_RE + rb"|" + _QUOTED + rb")"
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
_CHUNK_EXT: Final = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN_RE + rb"(?:[ \t]*=[ \t]*" + _CHUNK_EXT_VALUE + rb")?)+"
)

# Every byte allowed in a head besides CR and LF: VCHAR, SP, HTAB, obs-text.
_FIELD_CHARS: Final = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
# The same without HTAB: what deleting them leaves of a head is its CRLFs
# when it has neither a control byte nor an HTAB (the usual head).
_FIELD_CHARS_NO_TAB: Final = _FIELD_CHARS[1:]
# A line start (after CRLF) that is not "token:"; the start line is not preceded by CRLF.
_BAD_FIELD_START: Final = re.compile(rb"\r\n(?!" + _TOKEN_RE + rb":)")
# A field line start that is not "token: " followed by a byte that is neither
# whitespace nor CR: not a valid field line, or one whose value does not come
# right after a single space (searched first: when nothing matches, the
# _BAD_FIELD_START search has nothing to find either).
_NOT_PLAIN_FIELD_START: Final = re.compile(rb"\r\n(?!" + _TOKEN_RE + rb": [^ \t\r])")

#: Hop-by-hop fields: never forwarded (headers.HOP_BY_HOP, which strips them, says why).
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # Credentials for a proxy stay with the proxy (issue 11): never sent to
        # an origin, and an upstream's challenge never reaches the client.
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
#: The fields a proxy rewrites or drops: the hop-by-hop ones, Via, X-Forwarded-For.
MANAGED_FIELDS: Final = HOP_BY_HOP | {b"via", b"x-forwarded-for"}
"""Fields (lowercase) that a relaying proxy rewrites or drops: the hop-by-hop
fields (L{tproxy_twist.http.headers.HOP_BY_HOP}), Via and X-Forwarded-For.
A head with none of them may be forwarded as received (C{plain})."""


def _fields_pattern(names: frozenset[bytes]) -> re.Pattern[bytes]:
    # (lowercased name, value) of the named fields, searched in the lowercased
    # head in one pass.  The colon after the group makes a name match whole.
    alternatives = b"|".join(re.escape(name) for name in sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(rb"\r\n(" + alternatives + rb"):[ \t]*([^\r]*)")


# The lines dropped from a head that is plain but for these fields (see Request.trim).
_CONNECTION_LINES: Final = re.compile(rb"\r\n(?:connection|keep-alive|proxy-connection):[^\r]*")
_CONNECTION_ONLY: Final = frozenset({b"keep-alive", b"close"})
_KEEP_ALIVE_ONLY: Final = [b"keep-alive"]


def _trim(canonical: bool, conn: list[bytes] | None, low: bytes) -> bool:
    """Whether a head with only droppable managed fields is C{trim} (see L{Request})."""
    if not canonical:
        return False
    if conn is not None and conn != [b"keep-alive"] and not _tokens(conn) <= _CONNECTION_ONLY:
        return False
    # "Connection: close" also nominates a field named Close: the rewrite would drop it.
    return low.find(b"\r\nclose:") < 0


def _managed_facts(
    managed: list[tuple[bytes, bytes]] | None, canonical: bool, low: bytes
) -> tuple[list[bytes] | None, list[bytes] | None, bool]:
    """
    From the (lowercased name, value) of a head's proxy-managed fields: the
    Connection values, the Transfer-Encoding values (C{None} when absent) and
    whether the head is C{trim} (see L{Request}): plain but for Connection,
    Keep-Alive and Proxy-Connection fields that only say keep-alive or close.
    """
    if managed is None:
        return None, None, False
    conn: list[bytes] | None = None
    te: list[bytes] | None = None
    droppable = True
    for lname, value in managed:
        if lname == b"connection":
            value = value.rstrip(b" \t")
            conn = [value] if conn is None else [*conn, value]
        elif lname == b"transfer-encoding":
            value = value.rstrip(b" \t")
            te = [value] if te is None else [*te, value]
            droppable = False
        elif lname != b"keep-alive" and lname != b"proxy-connection":
            droppable = False
    if not droppable or not canonical:
        return conn, te, False
    if conn == _KEEP_ALIVE_ONLY:  # the usual Connection: keep-alive (_trim's answer, sooner)
        return conn, te, low.find(b"\r\nclose:") < 0
    return conn, te, _trim(canonical, conn, low)


# The fields that decide a request's framing and routing, and those a proxy manages.
_REQUEST_FIELDS: Final = _fields_pattern(MANAGED_FIELDS | {b"host", b"content-length", b"expect"})
_RESPONSE_FIELDS: Final = _fields_pattern(MANAGED_FIELDS | {b"content-length"})
_COLONS: Final = repeat(b":")
_MAX_CHUNK_SIZE_DIGITS: Final = 16
_MAX_CONTENT_LENGTH_DIGITS: Final = 64  # beyond any real body; keeps int() cheap

# --- reader states ---------------------------------------------------------------

_HEAD: Final = 0
_LENGTH: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_CRLF: Final = 4
_TRAILERS: Final = 5
_UNTIL_CLOSE: Final = 6
_END: Final = 7  # head emitted, no body: EndOfMessage is next
_DONE: Final = 8  # EndOfMessage emitted: PAUSED until start_next()
_TUNNEL: Final = 9
_CLOSED: Final = 10
_ERROR: Final = 11


class _Reader:
    """Buffering, body framing and limits shared by both directions."""

    __slots__ = (
        "_buf",
        "_pos",
        "_scan",
        "_line_ok",
        "_blank",
        "_state",
        "_remaining",
        "_eof",
        "_error",
        "_max_line",
        "_max_field_line",
        "_max_head",
        "_max_fields",
        "_max_chunk_ext",
    )

    # Statuses for this direction: malformed, start line too long, head too large,
    # Content-Length beyond reason.
    _BAD = 400
    _LINE_TOO_LONG = 414
    _HEAD_TOO_LARGE = 431
    _BODY_TOO_LARGE = 413
    _START_LINE = "request line"
    # Whether _check_head_allowed says anything (a call spared on every request head).
    _CHECKS_ALLOWED = False

    def __init__(
        self,
        *,
        max_line: int = 8192,
        max_head: int = 65536,
        max_fields: int = 100,
        max_chunk_ext: int = 4096,
        max_field_line: int | None = None,
    ) -> None:
        # _buf[_pos:] is unparsed.  _buf is the caller's bytes object while it is the
        # only data buffered (so a body slice can be handed on without a copy), and a
        # bytearray once two pieces had to be joined.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scan = 0  # where the search for the end of a head/trailer block resumes
        self._line_ok = False  # the start line is known to be within max_line
        self._blank = 0  # bytes of empty lines skipped before this message's start line
        self._state = _HEAD
        self._remaining = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._max_line = max_line
        self._max_field_line = max_line if max_field_line is None else max_field_line
        self._max_head = max_head
        self._max_fields = max_fields
        self._max_chunk_ext = max_chunk_ext

    # --- public API ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer (b"" is allowed)."""
        if not data:
            return
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if type(data) is not bytes:
            data = bytes(data)  # never alias a buffer the caller may reuse
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = data
            self._scan = 0
        elif type(buf) is bytearray:
            if pos:
                del buf[:pos]  # O(1): CPython moves the start of a bytearray
                self._scan = max(self._scan - pos, 0)
            buf += data
        else:
            joined = bytearray(memoryview(buf)[pos:])
            joined += data
            self._buf = joined
            self._scan = max(self._scan - pos, 0)
        self._pos = 0

    def feed_eof(self) -> None:
        """The peer closed its sending side; no more bytes will be fed."""
        self._eof = True

    def start_next(self) -> bool:
        """
        Begin the next message; legal only once EndOfMessage was returned.
        True when bytes after the message are buffered (L{buffered} is not 0).
        """
        if self._state != _DONE:
            raise RuntimeError("start_next() is only legal after EndOfMessage")
        self._state = _HEAD
        if self._pos >= len(self._buf):
            # Let go of the last piece read: an idle keep-alive connection
            # should not hold on to up to a whole socket read of bytes.
            self._buf = b""
            self._pos = 0
            self._scan = 0
            return False
        return True

    def take_buffered(self) -> bytes:
        """Return and forget every unparsed byte (for a connection that became a tunnel)."""
        buf = self._buf
        pos = self._pos
        if pos == 0 and type(buf) is bytes:
            out = buf
        else:
            out = bytes(buf[pos:])
        self._buf = b""
        self._pos = 0
        self._scan = 0
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """True between messages with nothing buffered (no partial message)."""
        return self._state in (_HEAD, _DONE, _CLOSED) and self._pos >= len(self._buf)

    # --- zero-copy bodies: the relay moves a Content-Length body around the reader ---

    @property
    def body_unread(self) -> int:
        """Bytes of the current Content-Length body neither received nor buffered (else 0)."""
        if self._state != _LENGTH:
            return 0
        return max(self._remaining - (len(self._buf) - self._pos), 0)

    def skip_body(self, n: int) -> None:
        """
        C{n} bytes of the current Content-Length body were relayed without
        passing through this reader; it goes on after them.
        """
        if n < 0 or n > self.body_unread:
            raise RuntimeError("skip_body() beyond the unread part of a Content-Length body")
        self._remaining -= n
        if not self._remaining:
            self._state = _END

    def take_end(self) -> bool:
        """
        If the next event would be C{EndOfMessage([])} (a message without a
        body, or whose Content-Length body was all read), take it: True, as
        if that event had been returned.  False, changing nothing, otherwise.
        For a caller that needs no event to learn what it already knows.
        """
        if self._state == _END:
            self._state = _DONE
            return True
        return False

    def take_body(self) -> bytes | None:
        """
        If the rest of the current Content-Length body is all buffered, take
        it and end the message: its bytes, as if the C{Data} and
        C{EndOfMessage} events that L{next_event} would return next had been
        returned.  C{None}, changing nothing, otherwise.
        """
        if self._state != _LENGTH:
            return None
        remaining = self._remaining
        if len(self._buf) - self._pos < remaining:
            return None
        self._state = _DONE
        return self._take(remaining)

    @property
    def eof(self) -> bool:
        """The peer closed its sending side (L{feed_eof} was called)."""
        return self._eof

    # --- the state machine -----------------------------------------------------

    def next_event(self) -> Event:
        """The next event; raises ProtocolError (and keeps raising it) on a bad message."""
        try:
            while True:
                state = self._state
                if state == _HEAD:
                    return self._read_head()
                if state == _LENGTH or state == _CHUNK_DATA:
                    avail = len(self._buf) - self._pos
                    if avail <= 0:
                        return self._need_data()
                    remaining = self._remaining
                    if avail >= remaining:
                        self._state = _END if state == _LENGTH else _CHUNK_CRLF
                        return Data(self._take(remaining))
                    self._remaining = remaining - avail
                    return Data(self._take(avail))
                if state == _END:
                    self._state = _DONE
                    return EndOfMessage([])
                if state == _DONE or state == _TUNNEL:
                    return PAUSED
                if state == _CHUNK_CRLF:
                    buf = self._buf
                    pos = self._pos
                    avail = len(buf) - pos
                    if avail >= 2:
                        if buf[pos] != 13 or buf[pos + 1] != 10:
                            raise ProtocolError(self._BAD, "chunk data not followed by CRLF")
                        self._pos = pos + 2
                        self._state = _CHUNK_SIZE
                        continue
                    if avail == 1 and buf[pos] != 13:
                        raise ProtocolError(self._BAD, "chunk data not followed by CRLF")
                    return self._need_data()
                if state == _CHUNK_SIZE:
                    event = self._read_chunk_size()
                    if event is not None:
                        return event
                    continue
                if state == _TRAILERS:
                    return self._read_trailers()
                if state == _UNTIL_CLOSE:
                    if self._pos < len(self._buf):
                        return Data(self._take(len(self._buf) - self._pos))
                    if self._eof:
                        self._state = _DONE
                        return EndOfMessage([])
                    return NEED_DATA
                if state == _CLOSED:
                    return CLOSED
                assert self._error is not None
                raise self._error
        except ProtocolError as e:
            self._state = _ERROR
            self._error = e
            raise

    def _need_data(self) -> _Sentinel:
        if self._eof:
            raise ProtocolError(self._BAD, "connection closed mid-message")
        return NEED_DATA

    def _take(self, n: int) -> bytes:
        """Consume n buffered bytes, reusing the fed bytes object when it is exactly that."""
        buf = self._buf
        pos = self._pos
        end = pos + n
        if end >= len(buf):
            self._buf = b""
            self._pos = 0
            if pos == 0 and type(buf) is bytes:
                return buf
            return bytes(buf[pos:])
        self._pos = end
        out = buf[pos:end]
        return out if type(out) is bytes else bytes(out)

    def _read_head(self) -> Event:
        buf = self._buf
        pos = self._pos
        n = len(buf)
        # RFC 9112 §2.2: ignore empty lines before the start line.  (An index
        # first: startswith() with a position parses its arguments each time.)
        if pos < n and buf[pos] == 13 and buf.startswith(b"\r\n", pos):
            start = pos
            while buf.startswith(b"\r\n", pos):
                pos += 2
            self._pos = pos
            self._blank += pos - start
            if self._blank > self._max_line:
                raise ProtocolError(
                    self._BAD, f"too many empty lines before the {self._START_LINE}"
                )
        if pos >= n:
            self._buf = b""
            self._pos = 0
            if self._eof:
                self._state = _CLOSED
                return CLOSED
            return NEED_DATA
        if self._CHECKS_ALLOWED:
            self._check_head_allowed()
        scan = self._scan
        end = buf.find(b"\r\n\r\n", scan if scan > pos else pos)  # _find_block's first step
        if end < 0:
            end = self._find_block(start_line=True)
            if end < 0:
                return self._need_data()
        head = buf[pos:end]
        if type(head) is not bytes:
            head = bytes(head)
        self._pos = end + 4
        self._scan = 0
        self._line_ok = False
        self._blank = 0
        # Check the head: ProtocolError if it is invalid.  The checks run over
        # the whole head in C (count, translate, one regex) rather than per
        # field; the field list is not built (_Message.headers does that when
        # asked).  The start line, and whether every field line is plainly
        # "name: value" (see Request), go on to _parse_head.
        crlfs = head.count(b"\r\n")
        first_end = head.find(b"\r\n") if crlfs else len(head)
        # Deleting every allowed byte leaves the controls: only the CRLFs may
        # remain.  Deleting them but HTAB first says in the same pass whether
        # the head has an HTAB (then not plain), the usual answer being no.
        tab = len(head.translate(None, _FIELD_CHARS_NO_TAB)) != 2 * crlfs
        if tab and len(head.translate(None, _FIELD_CHARS)) != 2 * crlfs:
            self._bad_control(head, head[:first_end])
        size = len(head)
        if size > self._max_line and first_end > self._max_line:
            raise ProtocolError(self._LINE_TOO_LONG, f"{self._START_LINE} too long")
        if size + 4 > self._max_head:
            raise ProtocolError(self._HEAD_TOO_LARGE, "header section too large")
        max_field = self._max_field_line
        if size > max_field:
            field_lines = head.split(b"\r\n")[1:]
            if field_lines and max(map(len, field_lines)) > max_field:
                raise ProtocolError(self._HEAD_TOO_LARGE, "header field line too long")
        if crlfs > self._max_fields:
            raise ProtocolError(self._HEAD_TOO_LARGE, "too many header fields")
        if _NOT_PLAIN_FIELD_START.search(head) is None:
            # Every field line is "token: " and a value: valid, and plain unless
            # whitespace ends a line or an HTAB is somewhere (rare: not worth a
            # closer look).
            plain = not tab and head.find(b" \r\n") < 0 and head[-1:] != b" "
        else:
            bad = _BAD_FIELD_START.search(head)
            if bad is not None:
                self._bad_field_line(head[bad.end() :].partition(b"\r\n")[0])
            plain = False
        return self._parse_head(head, head[:first_end], plain)

    def _check_head_allowed(self) -> None:
        """Hook: raise if no message may start here."""

    def _check_start_line(self, line: bytes) -> None:
        """Hook: raise if ``line`` (complete, head not yet) cannot start a valid message."""

    def _parse_head(self, head: bytes, start_line: bytes, canonical: bool) -> Event:
        """Hook: the event for a head that L{_read_head} checked (and what it found)."""
        raise NotImplementedError

    def _find_block(self, *, start_line: bool) -> int:
        """Index of the CRLFCRLF ending the block at _pos, or -1 (after limit checks)."""
        buf = self._buf
        pos = self._pos
        start = self._scan
        if start < pos:
            start = pos
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            return end
        n = len(buf)
        # Catch an LF-only peer now rather than when a limit is hit: every LF seen
        # since the last call must end a CRLF.
        if buf.count(b"\n", start, n) != buf.count(b"\r\n", start - 1 if start > pos else pos, n):
            raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
        if start_line and not self._line_ok:
            # The start line is checked as soon as it is complete, so that a line
            # that can never begin a valid head (an HTTP/0.9 request, say) is
            # answered at once instead of when the head times out.  No CRLF was in
            # the bytes searched before (else _line_ok would be set): resume there.
            max_line = self._max_line
            i = buf.find(b"\r\n", start, pos + max_line + 2)
            if i >= 0:
                self._check_start_line(bytes(buf[pos:i]))
                self._line_ok = True
            elif n - pos >= max_line + 2 or n - pos >= self._max_head:
                # Past the head limit with the start line still open: the line
                # alone is too long (414 rather than 431).
                raise ProtocolError(self._LINE_TOO_LONG, f"{self._START_LINE} too long")
        if n - pos >= self._max_head:
            raise ProtocolError(self._HEAD_TOO_LARGE, self._section_name(start_line) + " too large")
        self._scan = n - 3
        return -1

    def _section_name(self, start_line: bool) -> str:
        return "header section" if start_line else "trailer section"

    def _parse_trailers(self, block: bytes) -> Headers:
        """Check a trailer section (without its final CRLFCRLF) and parse its fields."""
        lines = block.split(b"\r\n")
        if len(block.translate(None, _FIELD_CHARS)) != 2 * (len(lines) - 1):
            self._bad_control(block, b"")
        size = len(block)
        if size + 4 > self._max_head:
            raise ProtocolError(self._HEAD_TOO_LARGE, "trailer section too large")
        max_field = self._max_field_line
        if size > max_field and max(map(len, lines)) > max_field:
            raise ProtocolError(self._HEAD_TOO_LARGE, "header field line too long")
        if len(lines) > self._max_fields:
            raise ProtocolError(self._HEAD_TOO_LARGE, "too many trailer fields")
        prefixed = b"\r\n" + block
        bad = _BAD_FIELD_START.search(prefixed)
        if bad is not None:
            self._bad_field_line(prefixed[bad.end() :].partition(b"\r\n")[0])
        return [(n, v.strip(b" \t")) for n, _, v in map(bytes.partition, lines, _COLONS)]

    def _bad_control(self, block: bytes, start_line: bytes) -> NoReturn:
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf:
            raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
        if block.count(b"\r") != crlf:
            raise ProtocolError(self._BAD, "bare CR in message head")
        if start_line and start_line.translate(None, _FIELD_CHARS):
            raise ProtocolError(self._BAD, f"control character in {self._START_LINE}")
        raise ProtocolError(self._BAD, "control character in header field")

    def _bad_field_line(self, line: bytes) -> NoReturn:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(self._BAD, "obsolete line folding (obs-fold) in header section")
        name, colon, _ = line.partition(b":")
        if not colon:
            raise ProtocolError(self._BAD, "header field line without a colon")
        stripped = name.rstrip(b" \t")
        if stripped and stripped != name and not stripped.translate(None, _TCHAR):
            raise ProtocolError(self._BAD, "whitespace between field name and colon")
        raise ProtocolError(self._BAD, "invalid header field name")

    def _content_length(self, values: list[bytes]) -> tuple[int, bytes, bool]:
        """Validate Content-Length values: (length, the value, whether it was repeated)."""
        first = values[0]
        repeated = len(values) > 1
        if repeated or first.find(b",") >= 0:
            items = []
            for v in values:
                items.extend(x.strip(b" \t") for x in v.split(b","))
            first = items[0]
            for item in items:
                if item != first:
                    if item.isdigit() and first.isdigit():
                        raise ProtocolError(self._BAD, "conflicting Content-Length headers")
                    raise ProtocolError(self._BAD, "invalid Content-Length")
            repeated = True
        if not first.isdigit():
            raise ProtocolError(self._BAD, "invalid Content-Length")
        if len(first) > _MAX_CONTENT_LENGTH_DIGITS and len(first.lstrip(b"0")) > (
            _MAX_CONTENT_LENGTH_DIGITS
        ):
            raise ProtocolError(self._BODY_TOO_LARGE, "Content-Length too large")
        return int(first.lstrip(b"0") or b"0"), first, repeated

    @staticmethod
    def _codings(values: list[bytes]) -> list[bytes]:
        codings = []
        for v in values:
            for item in v.split(b","):
                item = item.strip(b" \t")
                if item:
                    codings.append(item.lower())
        return codings

    def _read_chunk_size(self) -> Event | None:
        buf = self._buf
        pos = self._pos
        limit = _MAX_CHUNK_SIZE_DIGITS + self._max_chunk_ext
        i = buf.find(b"\r\n", pos)
        if i < 0:
            if buf.find(b"\n", pos) >= 0:
                raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
            if len(buf) - pos > limit:
                too_long = "extensions" if buf.find(b";", pos) >= 0 else "size"
                raise ProtocolError(self._BAD, f"chunk {too_long} too long")
            return self._need_data()
        if i - pos > limit:
            too_long = "extensions" if buf.find(b";", pos, i) >= 0 else "size"
            raise ProtocolError(self._BAD, f"chunk {too_long} too long")
        line = buf[pos:i]
        semi = line.find(b";")
        if semi < 0:
            size_part = line
        else:
            size_part = line[:semi].rstrip(b" \t")
            ext = line[len(size_part) :]
            if len(ext) > self._max_chunk_ext:
                raise ProtocolError(self._BAD, "chunk extensions too long")
            if _CHUNK_EXT.fullmatch(ext) is None:
                if b"\n" in ext:
                    raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
                raise ProtocolError(self._BAD, "malformed chunk extension")
        if not size_part or size_part.translate(None, _HEXDIG):
            if b"\n" in size_part:
                raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
            raise ProtocolError(self._BAD, "invalid chunk size")
        if len(size_part) > _MAX_CHUNK_SIZE_DIGITS:
            raise ProtocolError(self._BAD, "chunk size too long")
        size = int(size_part, 16)
        self._pos = i + 2
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._state = _TRAILERS
        return None

    def _read_trailers(self) -> Event:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail >= 2 and buf[pos] == 13 and buf[pos + 1] == 10:
            self._pos = pos + 2
            self._state = _DONE
            return EndOfMessage([])
        if avail < 2:
            if avail == 1 and buf[pos] == 10:
                raise ProtocolError(self._BAD, "bare LF line ending (CRLF required)")
            return self._need_data()
        end = self._find_block(start_line=False)
        if end < 0:
            return self._need_data()
        block = buf[pos:end]
        if type(block) is not bytes:
            block = bytes(block)
        self._pos = end + 4
        self._scan = 0
        trailers = self._parse_trailers(block)
        self._state = _DONE
        return EndOfMessage(trailers)


def _keep_alive(connection: list[bytes], http11: bool) -> bool:
    """Persistence from the (lowercased) Connection values (RFC 9112 §9.3)."""
    if len(connection) == 1:  # the usual single "keep-alive" or "close"
        value = connection[0]
        if value == b"close":
            return False
        if value == b"keep-alive":
            return True
    tokens = _tokens(connection)
    return b"close" not in tokens and (http11 or b"keep-alive" in tokens)


def _tokens(values: list[bytes]) -> set[bytes]:
    out = set()
    for v in values:
        for item in v.split(b","):
            item = item.strip(b" \t")
            if item:
                out.add(item.lower())
    return out


class RequestReader(_Reader):
    """Parses the requests a client sends on one connection (see the module docstring)."""

    __slots__ = ()

    def _check_start_line(self, line: bytes) -> None:
        if line.translate(None, _FIELD_CHARS):
            self._bad_control(line, line)
        _request_line(line)

    def check_chunk_size_ahead(self) -> None:
        """Raise ProtocolError now if the next chunk-size line, already buffered, is invalid.

        For a caller that wants to refuse a chunked request whose first chunk-size line
        came with its head before acting on the head.  Consumes nothing; a valid or
        incomplete line leaves the reader as it was.
        """
        if self._state != _CHUNK_SIZE:
            return
        pos, remaining = self._pos, self._remaining
        try:
            self._read_chunk_size()
        except ProtocolError as e:
            if e.reason == "connection closed mid-message":
                return  # not a verdict on the line: next_event() reports it
            self._state = _ERROR
            self._error = e
            raise
        self._pos, self._remaining, self._state = pos, remaining, _CHUNK_SIZE

    def _parse_head(self, head: bytes, start_line: bytes, canonical: bool) -> Event:
        method, target, version = _request_line(start_line)
        block = head
        headers: Headers | None = None  # built from the block when asked
        http11 = version == b"HTTP/1.1"
        host = 0
        cl: list[bytes] | None = None
        expect: list[bytes] | None = None
        managed: list[tuple[bytes, bytes]] | None = None  # fields a proxy rewrites or drops
        # Lowercased (name, value) of the fields that decide framing, and of those
        # a proxy manages, found in one pass.
        low = head.lower()
        for lname, value in _REQUEST_FIELDS.findall(low):
            if lname == b"host":
                host += 1
                value = value.rstrip(b" \t")
                # (_valid_host's first test, inline: the usual plain name.)
                if _plain_host(value) is None and not _valid_host(value):
                    raise ProtocolError(400, "invalid Host header")
            elif lname == b"content-length":
                value = value.rstrip(b" \t")
                cl = [value] if cl is None else [*cl, value]
            elif lname == b"expect":
                value = value.rstrip(b" \t")
                expect = [value] if expect is None else [*expect, value]
            else:  # a field the proxy rewrites or drops
                managed = [(lname, value)] if managed is None else [*managed, (lname, value)]
        if managed is None:
            conn = te = None
            trim = False
            plain = canonical
        else:
            conn, te, trim = _managed_facts(managed, canonical, low)
            plain = False
        if host > 1:
            raise ProtocolError(400, "multiple Host headers")
        if host == 0 and http11:
            raise ProtocolError(400, "missing Host header")

        body = "none"
        length: int | None = None
        if te is not None:
            if not http11:
                raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if cl is not None:
                raise ProtocolError(400, "both Transfer-Encoding and Content-Length")
            codings = self._codings(te)
            if not codings or codings[-1] != b"chunked":
                raise ProtocolError(400, "chunked is not the final transfer coding")
            if len(codings) > 1:
                if b"chunked" in codings[:-1]:
                    raise ProtocolError(400, "chunked applied more than once")
                raise ProtocolError(501, "unsupported transfer coding")
            body = "chunked"
        elif cl is not None:
            value = cl[0]
            if len(cl) == 1 and len(value) <= _MAX_CONTENT_LENGTH_DIGITS and value.isdigit():
                length = int(value)  # the usual single value (no comma: digits only)
                repeated = False
            else:
                length, raw, repeated = self._content_length(cl)
            if length:
                body = "length"
            if repeated:
                headers = _single_content_length(_field_list(head), raw)
                head = None  # the fields are no longer the lines received

        keep_alive = (
            http11 if conn is None else (conn == _KEEP_ALIVE_ONLY or _keep_alive(conn, http11))
        )
        expect_continue = False
        if expect is not None and http11:
            expect_continue = b"100-continue" in _tokens(expect)
        self._state = _LENGTH if body == "length" else (_CHUNK_SIZE if body == "chunked" else _END)
        self._remaining = length or 0
        return Request(
            method, target, version, headers, keep_alive, expect_continue, body, length, head,
            block, low, plain, trim,
        )  # fmt: skip


def _valid_host(value: bytes) -> bool:
    """Whether a Host value is C{host[:port]}: a reg-name or a valid IPv6 literal, and a
    port of 1-65535 if one is given.  Empty is valid (RFC 9112 §3.2); C{:80} is not."""
    if _PLAIN_HOST.fullmatch(value) is not None:
        return True  # the usual name or IPv4 address, without port or escapes: one C call
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    host, port = match.groups()
    if port is not None:  # there is a colon
        if not host:
            return False
        if port and (len(port) > 5 or not 0 < int(port) < 65536):
            return False
    if host[:1] == b"[":
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            return False
    return True


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(method, target, version) of a valid request line; ProtocolError otherwise."""
    parts = line.split(b" ")
    if len(parts) != 3:
        if len(parts) == 2 and parts[1][:1] == b"/" and parts[0].isalpha():
            raise ProtocolError(
                400, "request line without an HTTP version (HTTP/0.9 is not supported)"
            )
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if _HTTP_VERSION.fullmatch(version):
            raise ProtocolError(505, "HTTP version not supported")
        raise ProtocolError(400, "malformed request line")
    if method not in _COMMON_METHODS and (not method or method.translate(None, _TCHAR)):
        raise ProtocolError(400, "invalid method")
    if target[:1] != b"/" or method == b"CONNECT" or target.find(b"\t") >= 0:
        _check_target(method, target)  # (an origin-form target is valid as it is)
    return method, target, version


def _check_target(method: bytes, target: bytes) -> None:
    if not target or target.find(b"\t") >= 0:  # (find: `in` formats an exception first)
        raise ProtocolError(400, "invalid request-target")
    if method == b"CONNECT":
        if _AUTHORITY.fullmatch(target) is None:
            raise ProtocolError(400, "CONNECT needs an authority-form request-target (host:port)")
    elif target[0] == 47:  # b"/"
        return
    elif target == b"*":
        if method != b"OPTIONS":
            raise ProtocolError(400, "asterisk-form request-target is only allowed for OPTIONS")
    elif _SCHEME.match(target) is None:
        raise ProtocolError(400, "invalid request-target")


def _single_content_length(headers: Headers, value: bytes) -> Headers:
    out: Headers = []
    seen = False
    for name, v in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            if seen:
                continue
            seen = True
            v = value
        out.append((name, v))
    return out


def _without_content_length(headers: Headers) -> Headers:
    return [(n, v) for n, v in headers if not (len(n) == 14 and n.lower() == b"content-length")]


class ResponseReader(_Reader):
    """Parses the responses an upstream sends on one connection (see the module docstring).

    Every error is a ProtocolError with status 502.  Call ``expect(method)`` for
    each request sent upstream, in order; each final response answers the oldest.
    """

    __slots__ = ("_methods",)

    _BAD = 502
    _LINE_TOO_LONG = 502
    _HEAD_TOO_LARGE = 502
    _BODY_TOO_LARGE = 502
    _START_LINE = "status line"
    _CHECKS_ALLOWED = True

    def __init__(
        self,
        *,
        max_line: int = 8192,
        max_head: int = 65536,
        max_fields: int = 100,
        max_chunk_ext: int = 4096,
        max_field_line: int | None = None,
    ) -> None:
        super().__init__(
            max_line=max_line,
            max_head=max_head,
            max_fields=max_fields,
            max_chunk_ext=max_chunk_ext,
            max_field_line=max_field_line,
        )
        # A list, not a deque: at most one or two are queued, and an empty deque
        # costs about 700 bytes more than an empty list on every idle upstream.
        self._methods: list[bytes] = []

    def expect(self, method: bytes) -> None:
        """Queue the method of a request sent upstream (pipelining order)."""
        self._methods.append(method)

    def _check_head_allowed(self) -> None:
        if not self._methods:
            raise ProtocolError(502, "response without a request")

    def _check_start_line(self, line: bytes) -> None:
        if line.translate(None, _FIELD_CHARS):
            self._bad_control(line, line)
        _status_line(line)

    def _parse_head(self, head: bytes, start_line: bytes, canonical: bool) -> Event:
        version, status, reason = _status_line(start_line)
        http11 = version == b"HTTP/1.1"
        block = head
        low = head.lower()
        headers: Headers | None = None  # built from the block when asked

        if status < 200 and status != 101:
            # Interim: its fields say nothing about framing; the request is still open.
            self._state = _END
            return Response(version, status, reason, None, True, "none", None, block=block, low=low)
        method = self._methods.pop(0)

        cl: list[bytes] | None = None
        managed: list[tuple[bytes, bytes]] | None = None
        # As for requests: framing fields, and whether the proxy must rewrite the head.
        for lname, value in _RESPONSE_FIELDS.findall(low):
            if lname == b"content-length":
                value = value.rstrip(b" \t")
                cl = [value] if cl is None else [*cl, value]
            else:  # a field the proxy rewrites or drops
                managed = [(lname, value)] if managed is None else [*managed, (lname, value)]
        if managed is None:
            conn = te = None
            trim = False
            plain = canonical
            keep_alive = http11
        else:
            conn, te, trim = _managed_facts(managed, canonical, low)
            plain = False
            keep_alive = (
                http11 if conn is None else (conn == _KEEP_ALIVE_ONLY or _keep_alive(conn, http11))
            )

        length: int | None = None
        raw = b""
        repeated = False
        if cl is not None:
            value = cl[0]
            if len(cl) == 1 and len(value) <= _MAX_CONTENT_LENGTH_DIGITS and value.isdigit():
                length = int(value)  # the usual single value (no comma: digits only)
            else:
                length, raw, repeated = self._content_length(cl)
        if te is not None:
            if cl is not None:
                # RFC 9112 §6.3: Transfer-Encoding overrides; never forward both.
                headers = _without_content_length(_field_list(head))
                head = None  # the fields are no longer the lines received
                length = None
                keep_alive = False
            if not http11:
                keep_alive = False
        elif repeated:
            headers = _single_content_length(_field_list(head), raw)
            head = None

        if status == 101 or (method == b"CONNECT" and status < 300):
            # The switch happens whatever the method, and a 2xx (even 204) to CONNECT
            # opens the tunnel: after this head the bytes are no longer HTTP.
            body = "tunnel"
            length = None
            keep_alive = False
        elif method == b"HEAD" or status == 204 or status == 304:
            body = "none"
            length = None
        elif te is not None:
            codings = self._codings(te)
            if codings != [b"chunked"]:
                raise ProtocolError(502, "unsupported transfer coding in response")
            body = "chunked"
        elif length is not None:
            body = "length" if length else "none"
        else:
            body = "close"
            keep_alive = False

        if body == "none":
            self._state = _END
        elif body == "length":
            self._state = _LENGTH
            self._remaining = length or 0
        elif body == "chunked":
            self._state = _CHUNK_SIZE
        elif body == "close":
            self._state = _UNTIL_CLOSE
        else:
            self._state = _TUNNEL
        return Response(
            version, status, reason, headers, keep_alive, body, length, head,
            block, low, plain, trim,
        )  # fmt: skip


def _status_line(line: bytes) -> tuple[bytes, int, bytes]:
    """(version, status, reason) of a valid status line; ProtocolError 502 otherwise."""
    version, _, rest = line.partition(b" ")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise ProtocolError(502, "malformed status line")
    code, _, reason = rest.partition(b" ")
    if len(code) != 3 or not code.isdigit() or not b"100" <= code <= b"599":
        raise ProtocolError(502, "invalid status code")
    return version, int(code), reason
