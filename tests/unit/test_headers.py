"""Behaviour of the header policy and serialization helpers (tproxy_twist.http.headers)."""

from __future__ import annotations

from tproxy_twist.http.framing import (
    Data,
    EndOfMessage,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)
from tproxy_twist.http.headers import (
    HOP_BY_HOP,
    add_via,
    connection_tokens,
    encode_chunk,
    last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
    strip_hop_by_hop,
    via_value,
)


def test_hop_by_hop_set_is_the_rfc_list_with_proxy_authentication_fields() -> None:
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }


def test_proxy_credentials_and_challenges_never_pass_in_either_direction() -> None:
    request = [
        (b"Host", b"a"),
        (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
        (b"PROXY-CONNECTION", b"keep-alive"),
    ]
    response = [(b"Proxy-Authenticate", b'Basic realm="x"'), (b"Content-Length", b"0")]
    assert strip_hop_by_hop(request) == [(b"Host", b"a")]
    assert strip_hop_by_hop(response, keep_upgrade=True) == [(b"Content-Length", b"0")]


def test_connection_tokens_are_lowercased_across_all_connection_fields() -> None:
    headers = [
        (b"Connection", b"Keep-Alive, X-Foo"),
        (b"Host", b"a"),
        (b"connection", b" ,close ,, "),
    ]
    assert connection_tokens(headers) == {b"keep-alive", b"x-foo", b"close"}
    assert connection_tokens([(b"Host", b"a")]) == set()


def test_strip_hop_by_hop_removes_hop_by_hop_and_nominated_fields() -> None:
    headers = [
        (b"Host", b"example.com"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"PROXY-CONNECTION", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"x-secret", b"1"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Accept", b"*/*"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"Host", b"example.com"),
        (b"Accept", b"*/*"),
    ]


def test_strip_hop_by_hop_without_connection_field_removes_only_the_standard_set() -> None:
    headers = [(b"Host", b"a"), (b"Upgrade", b"h2c"), (b"Te", b"trailers"), (b"X-Te", b"1")]
    assert strip_hop_by_hop(headers) == [(b"Host", b"a"), (b"X-Te", b"1")]


def test_strip_hop_by_hop_keeps_content_length_and_host_even_if_nominated() -> None:
    headers = [
        (b"Host", b"example.com"),
        (b"Connection", b"Content-Length, Host, X-A"),
        (b"Content-Length", b"5"),
        (b"X-A", b"gone"),
    ]
    assert strip_hop_by_hop(headers) == [(b"Host", b"example.com"), (b"Content-Length", b"5")]


def test_strip_hop_by_hop_does_not_modify_its_argument() -> None:
    headers = [(b"Connection", b"close"), (b"Accept", b"*/*")]
    copy = list(headers)
    assert strip_hop_by_hop(headers) == [(b"Accept", b"*/*")]
    assert headers == copy


def test_keep_upgrade_keeps_upgrade_and_sends_connection_upgrade() -> None:
    headers = [
        (b"Host", b"example.com"),
        (b"Connection", b"Upgrade, Keep-Alive"),
        (b"Upgrade", b"websocket"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        (b"Host", b"example.com"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Connection", b"upgrade"),
    ]


def test_keep_upgrade_without_an_upgrade_field_adds_no_connection_field() -> None:
    headers = [(b"Connection", b"close"), (b"Accept", b"*/*")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [(b"Accept", b"*/*")]


def test_via_value_uses_the_protocol_version_without_the_http_prefix() -> None:
    assert via_value(b"HTTP/1.1", "router1") == b"1.1 router1 (tproxy-twist)"
    assert via_value(b"HTTP/1.0", "router1") == b"1.0 router1 (tproxy-twist)"


def test_add_via_appends_to_the_last_via_field() -> None:
    headers = [(b"Via", b"1.0 a"), (b"Host", b"h"), (b"via", b"1.1 b")]
    assert add_via(headers, b"1.1 me (tproxy-twist)") == [
        (b"Via", b"1.0 a"),
        (b"Host", b"h"),
        (b"via", b"1.1 b, 1.1 me (tproxy-twist)"),
    ]
    assert headers[2] == (b"via", b"1.1 b")  # argument untouched


def test_add_via_adds_a_via_field_when_there_is_none() -> None:
    assert add_via([(b"Host", b"h")], b"1.1 me") == [(b"Host", b"h"), (b"Via", b"1.1 me")]


def test_serialize_request_head_always_writes_http11_and_ends_with_crlfcrlf() -> None:
    head = serialize_request_head(b"GET", b"/x?y", [(b"Host", b"a"), (b"X-Y", b"z")])
    assert head == b"GET /x?y HTTP/1.1\r\nHost: a\r\nX-Y: z\r\n\r\n"


def test_serialize_response_head_writes_status_reason_and_version() -> None:
    assert (
        serialize_response_head(404, b"Not Found", [(b"Content-Length", b"0")])
        == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    assert serialize_response_head(200, b"OK", [], b"HTTP/1.0") == b"HTTP/1.0 200 OK\r\n\r\n"


def test_encode_chunk_frames_data_with_its_hex_size() -> None:
    data = b"x" * 26
    assert encode_chunk(data) == [b"1a\r\n", data, b"\r\n"]
    assert encode_chunk(data)[1] is data
    assert encode_chunk(b"") == []


def test_last_chunk_carries_the_trailers() -> None:
    assert last_chunk([]) == b"0\r\n\r\n"
    assert last_chunk([(b"X-Sum", b"1")]) == b"0\r\nX-Sum: 1\r\n\r\n"


def test_encoded_chunks_parse_back_to_the_same_body_and_trailers() -> None:
    body = b"".join(
        [
            *encode_chunk(b"hello "),
            *encode_chunk(b""),
            *encode_chunk(b"world"),
            last_chunk([(b"T", b"v")]),
        ]
    )
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert isinstance(reader.next_event(), Request)
    events = [reader.next_event() for _ in range(3)]
    assert events == [Data(b"hello "), Data(b"world"), EndOfMessage([(b"T", b"v")])]


def test_simple_response_is_a_complete_parseable_plain_text_response() -> None:
    raw = simple_response(
        502, b"Bad Gateway", "upstream said: caf\u00e9", close=True, extra=[(b"X-Why", b"spoof")]
    )
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(raw)
    head = reader.next_event()
    assert isinstance(head, Response)
    assert (head.status, head.reason, head.keep_alive) == (502, b"Bad Gateway", False)
    assert head.headers == [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"21"),  # UTF-8 bytes, not characters
        (b"Cache-Control", b"no-store"),
        (b"Connection", b"close"),
        (b"X-Why", b"spoof"),
    ]
    assert reader.next_event() == Data("upstream said: caf\u00e9\n".encode())
    assert reader.next_event() == EndOfMessage([])


def test_simple_response_without_close_keeps_the_connection() -> None:
    raw = simple_response(400, b"Bad Request", "no", close=False)
    assert raw.endswith(b"\r\n\r\nno\n")
    assert b"Connection" not in raw
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
