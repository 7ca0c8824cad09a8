"""Differential fuzz: tproxy_twist.http.framing and h11 read the same valid messages alike.

hypothesis writes valid HTTP/1.1 and HTTP/1.0 requests and responses (bodies
framed by Content-Length, chunked with extensions and trailers, by closing the
connection, or absent for HEAD / 204 / 304 and 1xx), cuts each into random
pieces, and feeds the pieces to a framing reader and to an h11 connection (an
independent, widely used HTTP/1.1 parser; a test-only dependency).  Both must
report the same method, target, status, fields and trailers in the same order
and case, the same body, and the same end of the message: the bytes that follow
(the start of the next message on the connection) are left unread by both.

Run deeper with TPROXY_HYPOTHESIS_SCALE=20 (or more) after changing framing.py.
"""

from __future__ import annotations

import os

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy_twist.http.framing import (
    NEED_DATA,
    Data,
    EndOfMessage,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)

SCALE = int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1"))
SETTINGS = settings(
    max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- valid messages ------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Fields whose meaning a parser acts on are added deliberately, never at random.
MEANINGFUL = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"expect",
    b"upgrade",
    b"te",
    b"trailer",
}
VALUE_BYTES = [0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)]

tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
names = tokens.filter(lambda name: name.lower() not in MEANINGFUL)
values = st.lists(st.sampled_from(VALUE_BYTES), max_size=24).map(lambda b: bytes(b).strip(b" \t"))
field_lists = st.lists(st.tuples(names, values), max_size=6)
ows = st.sampled_from([b"", b" ", b"\t", b"  "])
bodies = st.binary(max_size=80)
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"X-Ext"])
paths = st.text(alphabet="abcxyz019-._~/?=&%!$'()*+,;:@", max_size=24).map(
    lambda t: b"/" + t.encode()
)
absolute = st.tuples(
    st.sampled_from([b"http://a.example", b"http://203.0.113.2:8080", b"http://[2001:db8::2]"]),
    st.one_of(st.just(b""), paths),
).map(b"".join)

# Whatever follows a message on the connection; both parsers must leave it unread.
NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n"
NEXT_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def write_fields(draw: st.DrawFn, fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(n + b":" + draw(ows) + v + draw(ows) + b"\r\n" for n, v in fields)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(the chunked encoding, the decoded body, the trailer fields)."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    raw = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper().rjust(draw(st.integers(1, 4)), b"0")
        ext = draw(st.sampled_from([b"", b";a", b";name=value", b';q="x y"']))
        raw += size + ext + b"\r\n" + piece + b"\r\n"
    trailers = draw(st.lists(st.tuples(names, values), max_size=3))
    raw += b"0\r\n" + write_fields(draw, trailers) + b"\r\n"
    return raw, b"".join(pieces), trailers


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """A valid request and what it means."""
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    method = draw(methods)
    target = draw(st.one_of(paths, absolute))
    if method == b"OPTIONS" and draw(st.booleans()):
        target = b"*"
    fields = draw(field_lists)
    if version == b"HTTP/1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"a.example"))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "chunked" and version == b"HTTP/1.0":
        framing = "length"
    body = raw_body = b""
    trailers: list[tuple[bytes, bytes]] = []
    if framing == "length":
        body = raw_body = draw(bodies)
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        raw_body, body, trailers = draw(chunked())
        te = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", te))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive"]))
    if connection is not None:
        fields.append((b"Connection", connection))
    raw = b"%s %s %s\r\n%s\r\n%s" % (method, target, version, write_fields(draw, fields), raw_body)
    meaning = {
        "method": method,
        "target": target,
        "fields": fields,
        "body": body,
        "trailers": trailers,
        "compare_keep_alive": not (version == b"HTTP/1.0" and connection == b"keep-alive"),
    }
    return raw, meaning


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, dict[str, object]]:
    """(the request method, a valid response to it, what it means)."""
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 206, 301, 304, 404, 418, 500, 503]))
    reason = draw(st.sampled_from([b"OK", b"", b"Some Reason", b"\xe9t\xe9", b"A\tB"]))
    fields = draw(field_lists)
    kinds = ["length", "close"] + (["chunked"] if version == b"HTTP/1.1" else [])
    kind = draw(st.sampled_from(kinds))
    body = raw_body = b""
    trailers: list[tuple[bytes, bytes]] = []
    if kind == "length":
        body = raw_body = draw(bodies)
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", b"%d" % len(body)))
    elif kind == "chunked":
        raw_body, body, trailers = draw(chunked())
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", b"chunked"))
    else:
        body = raw_body = draw(bodies)
    if kind != "close" and draw(st.booleans()):
        fields.append((b"Connection", b"close"))
    bodiless = method == b"HEAD" or status in (204, 304)
    if bodiless:
        # The fields still describe the body a GET would have had; none follows.
        body, raw_body, trailers = b"", b"", []
        if kind == "close":
            fields.append((b"Content-Length", b"%d" % len(draw(bodies))))
            kind = "length"
    interim = b""
    if version == b"HTTP/1.1" and draw(st.booleans()):
        interim = b"HTTP/1.1 100 Continue\r\n" + write_fields(draw, draw(field_lists)) + b"\r\n"
    head = b"%s %d %s\r\n%s\r\n" % (version, status, reason, write_fields(draw, fields))
    raw = interim + head + raw_body
    meaning = {
        "status": status,
        "reason": reason,
        "fields": fields,
        "body": body,
        "trailers": trailers,
        "close_delimited": kind == "close" and not bodiless,
    }
    return method, raw, meaning


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts``, without empty pieces (b"" is EOF to h11)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [piece for piece in pieces if piece]


# --- the two parsers -----------------------------------------------------------------


def read_with_framing(
    reader: RequestReader | ResponseReader, pieces: list[bytes], eof: bool
) -> dict[str, object]:
    """Feed ``pieces`` until the first final message ends; report it and the unread bytes."""
    out: dict[str, object] = {"body": b"", "interim": 0}
    rest = list(pieces)
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            if rest:
                reader.feed(rest.pop(0))
            else:
                assert eof, "framing wants more bytes than the message has"
                reader.feed_eof()
                eof = False
            continue
        if isinstance(event, Request):
            out.update(method=event.method, target=event.target, fields=event.headers)
            out["keep_alive"] = event.keep_alive
        elif isinstance(event, Response):
            if event.interim:
                out["interim"] += 1
                assert isinstance(reader.next_event(), EndOfMessage)
                reader.start_next()
                continue
            out.update(status=event.status, reason=event.reason, fields=event.headers)
            out["keep_alive"] = event.keep_alive
        elif isinstance(event, Data):
            out["body"] += event.data
        else:
            assert isinstance(event, EndOfMessage), event
            out["trailers"] = event.trailers
            out["unread"] = reader.take_buffered() + b"".join(rest)
            return out


def read_with_h11(conn: h11.Connection, pieces: list[bytes], eof: bool) -> dict[str, object]:
    """The same as L{read_with_framing}, with h11."""
    out: dict[str, object] = {"body": b"", "interim": 0}
    rest = list(pieces)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if rest:
                conn.receive_data(rest.pop(0))
            else:
                assert eof, "h11 wants more bytes than the message has"
                conn.receive_data(b"")
                eof = False
            continue
        if isinstance(event, h11.Request):
            out.update(method=event.method, target=event.target)
            out["fields"] = list(event.headers.raw_items())
        elif isinstance(event, h11.InformationalResponse):
            out["interim"] += 1
        elif isinstance(event, h11.Response):
            out.update(status=event.status_code, reason=event.reason)
            out["fields"] = list(event.headers.raw_items())
        elif isinstance(event, h11.Data):
            out["body"] += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), event
            out["trailers"] = list(event.headers.raw_items())
            out["keep_alive"] = conn.their_state is h11.DONE
            out["unread"] = conn.trailing_data[0] + b"".join(rest)
            return out


def comparable(out: dict[str, object]) -> dict[str, object]:
    """``out`` with Transfer-Encoding values lowercased: h11 normalizes them (the
    coding name is case-insensitive), framing hands them on as received."""
    fields = [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in out["fields"]]
    return {**out, "fields": fields}


# --- the properties ------------------------------------------------------------------


@SETTINGS
@given(requests(), st.lists(st.integers(0, 10_000), max_size=8))
def test_framing_and_h11_agree_on_every_valid_request(
    message: tuple[bytes, dict[str, object]], cuts: list[int]
) -> None:
    raw, meaning = message
    pieces = split(raw + NEXT_REQUEST, cuts)
    ours = comparable(read_with_framing(RequestReader(), pieces, eof=False))
    theirs = comparable(
        read_with_h11(
            h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20), pieces, eof=False
        )
    )
    for key in ("method", "target", "fields", "body", "trailers", "unread"):
        assert ours[key] == theirs[key], key
    assert (ours["method"], ours["target"], ours["body"]) == (
        meaning["method"],
        meaning["target"],
        meaning["body"],
    )
    assert ours["unread"] == NEXT_REQUEST  # the body ended exactly where it should
    if meaning["compare_keep_alive"]:
        assert ours["keep_alive"] == theirs["keep_alive"]


@SETTINGS
@given(responses(), st.lists(st.integers(0, 10_000), max_size=8))
def test_framing_and_h11_agree_on_every_valid_response(
    message: tuple[bytes, bytes, dict[str, object]], cuts: list[int]
) -> None:
    method, raw, meaning = message
    close_delimited = meaning["close_delimited"]
    following = b"" if close_delimited else NEXT_RESPONSE
    pieces = split(raw + following, cuts)
    reader = ResponseReader()
    reader.expect(method)
    ours = read_with_framing(reader, pieces, eof=close_delimited)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a.example")]))
    conn.send(h11.EndOfMessage())
    theirs = read_with_h11(conn, pieces, eof=close_delimited)
    for key in ("status", "reason", "fields", "body", "trailers", "unread", "interim"):
        assert ours[key] == theirs[key], key
    assert (ours["status"], ours["body"]) == (meaning["status"], meaning["body"])
    assert ours["unread"] == following  # the body ended exactly where it should
    if close_delimited:
        # h11 reports DONE before it sees the close; the connection cannot be reused.
        assert ours["keep_alive"] is False
    else:
        assert ours["keep_alive"] == theirs["keep_alive"]
