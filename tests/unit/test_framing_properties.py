"""Properties of the HTTP/1.1 readers that must hold for any input (hypothesis)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy_twist.http.framing import (
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
from tproxy_twist.http.headers import (
    encode_chunk,
    last_chunk,
    serialize_request_head,
    serialize_response_head,
)

# Example counts keep this file near 5 s.  When changing framing.py, run it with
# TPROXY_HYPOTHESIS_SCALE=20 (or more) for a deeper search.
SCALE = int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1"))
FAST = settings(
    max_examples=100 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
MANY = settings(
    max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- strategies for valid messages -----------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FRAMING_FIELDS = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect"}
VALUE_BYTES = [0x09, 0x20, *range(0x21, 0x7F), *range(0x80, 0x100)]

tokens = st.text(alphabet=TCHAR, min_size=1, max_size=10).map(str.encode)
field_names = tokens.filter(lambda name: name.lower() not in FRAMING_FIELDS)
field_values = st.lists(st.sampled_from(VALUE_BYTES), max_size=20).map(
    lambda b: bytes(b).strip(b" \t")
)
fields = st.lists(st.tuples(field_names, field_values), max_size=6)
targets = st.text(alphabet="abcxyz019-._~/?=&%", max_size=20).map(lambda t: b"/" + t.encode())
chunk_extensions = st.sampled_from([b"", b";a", b";a=b", b' ; q="x; \\"y"', b";n=v;m", b"\t;x"])
bodies = st.binary(max_size=60)
ows = st.sampled_from([b"", b" ", b"\t", b" \t "])


def write_fields(draw: st.DrawFn, headers: list[tuple[bytes, bytes]]) -> bytes:
    """Field lines with random optional whitespace around each value."""
    return b"".join(n + b":" + draw(ows) + v + draw(ows) + b"\r\n" for n, v in headers)


@dataclass
class Message:
    """A valid message and what ``run`` must report for it.

    ``expected`` holds one ``(head, body, trailers)`` per message (an interim
    response adds its own), or ``(head,)`` for a tunnel response, which never ends.
    """

    raw: bytes
    expected: list[tuple[object, ...]] = field(default_factory=list)


@st.composite
def chunked_body(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    pieces = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
    raw = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper().rjust(draw(st.integers(1, 6)), b"0")
        raw += size + draw(chunk_extensions) + b"\r\n" + piece + b"\r\n"
    trailers = draw(st.lists(st.tuples(field_names, field_values), max_size=2))
    raw += b"0" + draw(chunk_extensions) + b"\r\n"
    raw += write_fields(draw, trailers) + b"\r\n"
    return raw, b"".join(pieces), trailers


@st.composite
def requests(draw: st.DrawFn, version: bytes | None = None) -> Message:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"X-CUSTOM"]))
    target = draw(targets)
    version = version or draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = [(b"Host", b"example.com"), *draw(fields)]
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "chunked" and version == b"HTTP/1.0":
        framing = "length"
    body = b""
    trailers: list[tuple[bytes, bytes]] = []
    raw_body = b""
    length = None
    if framing == "length":
        body = raw_body = draw(bodies)
        length = len(body)
        headers.insert(draw(st.integers(0, len(headers))), (b"Content-Length", b"%d" % length))
        if not length:
            framing = "none"
    elif framing == "chunked":
        raw_body, body, trailers = draw(chunked_body())
        headers.append((b"Transfer-Encoding", b"chunked"))
    keep_alive = version == b"HTTP/1.1"
    if draw(st.booleans()):
        headers.append((b"Connection", b"close"))
        keep_alive = False
    raw = b"%s %s %s\r\n%s\r\n" % (method, target, version, write_fields(draw, headers))
    raw = b"\r\n" * draw(st.integers(0, 2)) + raw + raw_body
    head = (method, target, version, headers, keep_alive, framing, length)
    return Message(raw, [(head, body, trailers)])


# (method to expect, response); a final "close" or tunnel response must end the stream.
@st.composite
def responses(draw: st.DrawFn, last: bool = False) -> tuple[bytes, Message]:
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"CONNECT"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    kinds = ["length", "chunked", "interim"]
    if method != b"CONNECT":  # a 204 to CONNECT opens a tunnel
        kinds += ["none204", "none304"]
    if last:
        kinds += ["close", "switch"]
    kind = draw(st.sampled_from(kinds))
    status = {"none204": 204, "none304": 304, "switch": 101}.get(kind, 200)
    if method == b"CONNECT" and status == 200:
        if last and draw(st.booleans()):
            kind = "switch"  # 200 Connection established
        else:
            status = 407
    reason = draw(st.sampled_from([b"OK", b"", b"Some Reason", b"\xe9t\xe9"]))
    headers = draw(fields)
    raw_body = body = b""
    trailers: list[tuple[bytes, bytes]] = []
    framing = "none"
    length = None
    keep_alive = version == b"HTTP/1.1"
    prefix = b""
    expected: list[tuple[object, ...]] = []
    if kind == "interim":
        interim_fields = draw(fields)
        prefix = b"%s 100 Continue\r\n%s\r\n" % (version, write_fields(draw, interim_fields))
        interim_head = (version, 100, b"Continue", interim_fields, True, "none", None)
        expected.append((interim_head, b"", []))
        kind = "length"
    if kind == "length":
        body = raw_body = draw(bodies)
        headers.append((b"Content-Length", b"%d" % len(body)))
        framing = "length" if body else "none"
        length = len(body)
    elif kind == "chunked":
        raw_body, body, trailers = draw(chunked_body())
        headers.append((b"Transfer-Encoding", b"chunked"))
        framing = "chunked"
        if version == b"HTTP/1.0":
            keep_alive = False
    elif kind == "close":
        body = raw_body = draw(bodies)
        framing = "close"
        keep_alive = False
    elif kind == "switch":
        raw_body = draw(bodies)  # tunnel bytes, not a body
        framing = "tunnel"
        keep_alive = False
    if method == b"HEAD" and framing != "tunnel":
        framing, length, body, trailers, raw_body = "none", None, b"", [], b""
        keep_alive = version == b"HTTP/1.1"
    status_line = b"%s %d %s\r\n" % (version, status, reason)
    raw = prefix + status_line + write_fields(draw, headers) + b"\r\n" + raw_body
    head = (version, status, reason, headers, keep_alive, framing, length)
    expected.append((head,) if framing == "tunnel" else (head, body, trailers))
    return method, Message(raw, expected)


# --- driving a reader ------------------------------------------------------------


def request_head(event: Request) -> tuple[object, ...]:
    return (
        event.method,
        event.target,
        event.version,
        event.headers,
        event.keep_alive,
        event.body,
        event.content_length,
    )


def response_head(event: Response) -> tuple[object, ...]:
    return (
        event.version,
        event.status,
        event.reason,
        event.headers,
        event.keep_alive,
        event.body,
        event.content_length,
    )


def run(reader: RequestReader | ResponseReader, pieces: list[bytes]) -> list[object]:
    """Feed ``pieces`` then EOF and report what came out.

    Returns ``[*messages, tunnel_bytes, closed_cleanly]`` where each message is
    ``(head, body, trailers)``, or ``(head,)`` for a response that became a tunnel.
    """
    messages: list[object] = []
    current: list[object] = []
    body: list[bytes] = []
    tunnel: list[bytes] = []
    ended = False

    def drain() -> bool:
        nonlocal ended
        while True:
            event = reader.next_event()
            if event is NEED_DATA or event is CLOSED:
                return event is CLOSED
            if event is PAUSED:
                if ended:
                    ended = False
                    reader.start_next()
                    continue
                if current:  # a tunnel head: record it once
                    messages.append(tuple(current))
                    current.clear()
                tunnel.append(reader.take_buffered())
                return False
            if isinstance(event, Request):
                current[:] = [request_head(event)]
            elif isinstance(event, Response):
                current[:] = [response_head(event)]
            elif isinstance(event, Data):
                assert event.data, "empty Data event"
                body.append(event.data)
            else:
                assert isinstance(event, EndOfMessage)
                messages.append((*current, b"".join(body), event.trailers))
                current.clear()
                body.clear()
                ended = True

    for piece in pieces:
        reader.feed(piece)
        drain()
    reader.feed_eof()
    closed = drain()
    return [*messages, b"".join(tunnel), closed]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def expected(messages: list[Message], tunnel: bytes, closed: bool) -> list[object]:
    return [*(e for m in messages for e in m.expected), tunnel, closed]


# --- property 1: splitting the stream does not change the events ---------------------


@FAST
@given(st.lists(requests(), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_a_request_stream_gives_the_same_events(
    messages: list[Message], cuts: list[int]
) -> None:
    stream = b"".join(m.raw for m in messages)
    whole = run(RequestReader(), [stream])
    assert whole == expected(messages, b"", True)
    assert run(RequestReader(), split(stream, cuts)) == whole


@FAST
@given(requests())
def test_a_request_fed_one_byte_at_a_time_gives_the_same_events(message: Message) -> None:
    pieces = [message.raw[i : i + 1] for i in range(len(message.raw))]
    assert run(RequestReader(), pieces) == run(RequestReader(), [message.raw])


@FAST
@given(
    st.lists(responses(), max_size=3),
    responses(last=True),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_of_a_response_stream_gives_the_same_events(
    first: list[tuple[bytes, Message]], last: tuple[bytes, Message], cuts: list[int]
) -> None:
    exchanges = [*first, last]
    stream = b"".join(m.raw for _, m in exchanges)

    def reader() -> ResponseReader:
        r = ResponseReader()
        for method, _ in exchanges:
            r.expect(method)
        return r

    messages = [m for _, m in exchanges]
    whole = run(reader(), [stream])
    if len(last[1].expected[-1]) == 1:  # a tunnel: the rest of its bytes are not HTTP
        tunnel = last[1].raw.partition(b"\r\n\r\n")[2]
        assert whole == expected(messages, tunnel, False)
    else:
        assert whole == expected(messages, b"", True)
    assert run(reader(), split(stream, cuts)) == whole


# --- property 2: malformed input only ever raises ProtocolError ------------------------

mutations = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete"]),
        st.integers(0, 10_000),
        st.one_of(
            st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b",", b"0", b"\x00"]),
            st.binary(min_size=1, max_size=4),
        ),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    for op, at, chunk in edits:
        at %= len(data) + 1
        if op == "replace":
            data = data[:at] + chunk + data[at + len(chunk) :]
        elif op == "insert":
            data = data[:at] + chunk + data[at:]
        else:
            data = data[:at] + data[at + len(chunk) :]
    return data


def survive(reader: RequestReader | ResponseReader, pieces: list[bytes]) -> None:
    try:
        run(reader, pieces)
    except ProtocolError as e:
        assert e.status in (400, 413, 414, 431, 501, 505, 502)
        assert e.reason
        try:
            reader.next_event()
        except ProtocolError as again:
            assert again is e
        else:
            raise AssertionError("a ProtocolError must be sticky") from None


@MANY
@given(
    st.lists(requests(), min_size=1, max_size=3),
    mutations,
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_mutated_requests_raise_nothing_but_protocol_error(
    messages: list[Message], edits: list[tuple[str, int, bytes]], cuts: list[int]
) -> None:
    data = mutate(b"".join(m.raw for m in messages), edits)
    survive(RequestReader(max_line=256, max_head=512, max_fields=8, max_chunk_ext=16), [data])
    survive(RequestReader(), split(data, cuts))


@MANY
@given(
    st.lists(responses(), max_size=2),
    responses(last=True),
    mutations,
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_mutated_responses_raise_nothing_but_protocol_error(
    first: list[tuple[bytes, Message]],
    last: tuple[bytes, Message],
    edits: list[tuple[str, int, bytes]],
    cuts: list[int],
) -> None:
    exchanges = [*first, last]
    data = mutate(b"".join(m.raw for _, m in exchanges), edits)
    for reader, pieces in (
        (ResponseReader(max_line=256, max_head=512, max_fields=8, max_chunk_ext=16), [data]),
        (ResponseReader(), split(data, cuts)),
    ):
        for method, _ in exchanges:
            reader.expect(method)
        survive(reader, pieces)


@MANY
@given(st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=5))
def test_random_bytes_raise_nothing_but_protocol_error(data: bytes, cuts: list[int]) -> None:
    survive(RequestReader(), split(data, cuts))
    reader = ResponseReader()
    reader.expect(b"GET")
    survive(reader, split(data, cuts))


# --- property 3: re-serializing a parsed message gives back the same message -----------


def reencode_body(framing: str, body: bytes, trailers: list[tuple[bytes, bytes]]) -> bytes:
    if framing == "chunked":
        return b"".join(encode_chunk(body)) + last_chunk(trailers)
    return body


@FAST
@given(requests(version=b"HTTP/1.1"))
def test_a_request_reserialized_with_headers_helpers_parses_the_same(message: Message) -> None:
    [first, *_] = run(RequestReader(), [message.raw])
    head, body, trailers = first  # type: ignore[misc]
    method, target, _, headers, _, framing, _ = head
    again = serialize_request_head(method, target, headers) + reencode_body(framing, body, trailers)
    assert run(RequestReader(), [again])[0] == first


@FAST
@given(responses())
def test_a_response_reserialized_with_headers_helpers_parses_the_same(
    exchange: tuple[bytes, Message],
) -> None:
    method, message = exchange

    def parse(raw: bytes) -> object:
        reader = ResponseReader()
        reader.expect(method)
        return run(reader, [raw])[-3]  # the final response (after any interim one)

    final = parse(message.raw)
    head, body, trailers = final  # type: ignore[misc]
    version, status, reason, headers, _, framing, _ = head
    again = serialize_response_head(status, reason, headers, version)
    assert parse(again + reencode_body(framing, body, trailers)) == final
