"""Issue 10 semantics in the readers: early start-line checks, head limits, trailers.

The limits here are the ones the relay builds its readers with from the
configuration defaults (L{tproxy_twist.config.Limits}), so these tests say what a
client and an origin get from a proxy with the default configuration.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy_twist.config import Limits
from tproxy_twist.http.framing import (
    NEED_DATA,
    Data,
    EndOfMessage,
    ProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)
from tproxy_twist.http.headers import TRAILER_FIELDS, forwardable_trailers, last_chunk

DEFAULTS = Limits()


def default_request_reader() -> RequestReader:
    """A request reader as the relay makes it with the default limits."""
    return RequestReader(
        max_line=DEFAULTS.max_request_line,
        max_head=DEFAULTS.max_header_size,
        max_field_line=DEFAULTS.max_header_size,
        max_fields=DEFAULTS.max_header_fields,
        max_chunk_ext=DEFAULTS.max_chunk_extensions,
    )


def default_response_reader(method: bytes = b"GET") -> ResponseReader:
    """A response reader as the relay makes it with the default limits."""
    reader = ResponseReader(
        max_line=DEFAULTS.max_response_header_size,
        max_head=DEFAULTS.max_response_header_size,
        max_field_line=DEFAULTS.max_response_header_size,
        max_fields=DEFAULTS.max_header_fields,
        max_chunk_ext=DEFAULTS.max_chunk_extensions,
    )
    reader.expect(method)
    return reader


def events(reader: RequestReader | ResponseReader) -> list[object]:
    out: list[object] = []
    while True:
        event = reader.next_event()
        out.append(event)
        if isinstance(event, EndOfMessage) or event is NEED_DATA:
            return out


# --- the start line is judged as soon as it is complete ----------------------------


def test_http09_request_line_is_400_as_soon_as_its_line_ends() -> None:
    reader = RequestReader()
    reader.feed(b"GET /\r\n")  # an HTTP/0.9 client sends nothing more
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 400
    assert "HTTP/0.9" in info.value.reason


def test_http09_request_line_fed_byte_by_byte_is_refused_at_its_crlf() -> None:
    reader = RequestReader()
    for byte in b"GET /index.html":
        reader.feed(bytes([byte]))
        assert reader.next_event() is NEED_DATA
    reader.feed(b"\r")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert (info.value.status, "HTTP/0.9" in info.value.reason) == (400, True)


@pytest.mark.parametrize(
    "line, status",
    [
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/0.9", 505),
        (b"HELLO THERE", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"G(T / HTTP/1.1", 400),
        (b"GET nowhere HTTP/1.1", 400),
        (b"GET /a\x00b HTTP/1.1", 400),
    ],
)
def test_invalid_request_line_is_answered_before_the_head_ends(line: bytes, status: int) -> None:
    reader = RequestReader()
    reader.feed(line + b"\r\nHost: a.example\r\n")  # no CRLFCRLF yet
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == status


def test_control_character_in_an_early_request_line_keeps_its_reason() -> None:
    reader = RequestReader()
    reader.feed(b"GET /a\x00b HTTP/1.1\r\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.reason == "control character in request line"


def test_valid_request_line_of_an_incomplete_head_waits_for_more() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\n")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\r\n")
    assert isinstance(reader.next_event(), Request)


def test_status_line_that_is_invalid_is_502_before_the_head_ends() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(b"HTTP/1.1 2000 OK\r\nServer: x\r\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 502


# --- limits no stricter than real clients and servers ------------------------------


def test_default_limits_allow_64_kib_heads_and_16_kib_urls() -> None:
    assert DEFAULTS.max_header_size >= 65536
    assert DEFAULTS.max_response_header_size >= 65536
    assert DEFAULTS.max_request_line >= 16384


def test_9000_byte_cookie_passes_with_the_default_limits() -> None:
    cookie = b"a=" + b"c" * 8998
    reader = default_request_reader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\nCookie: " + cookie + b"\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, Request)
    assert head.get(b"cookie") == cookie


def test_16_kib_url_passes_with_the_default_limits() -> None:
    target = b"/" + b"u" * 16383
    reader = default_request_reader()
    reader.feed(b"GET " + target + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, Request) and head.target == target


def test_9000_byte_set_cookie_passes_with_the_default_limits() -> None:
    cookie = b"s=" + b"c" * 8998
    reader = default_response_reader()
    reader.feed(b"HTTP/1.1 200 OK\r\nSet-Cookie: " + cookie + b"\r\nContent-Length: 0\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, Response)
    assert head.get(b"set-cookie") == cookie


def test_request_head_of_64_kib_passes_and_one_byte_more_is_431() -> None:
    base = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Fill: \r\n\r\n"
    fill = b"f" * (DEFAULTS.max_header_size - len(base))
    ok = default_request_reader()
    ok.feed(base.replace(b"X-Fill: ", b"X-Fill: " + fill))
    assert isinstance(ok.next_event(), Request)
    too_big = default_request_reader()
    too_big.feed(base.replace(b"X-Fill: ", b"X-Fill: f" + fill))
    with pytest.raises(ProtocolError) as info:
        too_big.next_event()
    assert info.value.status == 431


def test_response_head_of_64_kib_passes_and_one_byte_more_is_502() -> None:
    base = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Fill: \r\n\r\n"
    fill = b"f" * (DEFAULTS.max_response_header_size - len(base))
    ok = default_response_reader()
    ok.feed(base.replace(b"X-Fill: ", b"X-Fill: " + fill))
    assert isinstance(ok.next_event(), Response)
    too_big = default_response_reader()
    too_big.feed(base.replace(b"X-Fill: ", b"X-Fill: f" + fill))
    with pytest.raises(ProtocolError) as info:
        too_big.next_event()
    assert info.value.status == 502


def test_field_line_limit_is_separate_from_the_request_line_limit() -> None:
    reader = RequestReader(max_line=100, max_field_line=50)
    reader.feed(b"GET /" + b"u" * 70 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert isinstance(reader.next_event(), Request)  # an 85-byte request line is fine
    reader = RequestReader(max_line=100, max_field_line=50)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\nX: " + b"v" * 60 + b"\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert (info.value.status, info.value.reason) == (431, "header field line too long")


def test_request_line_over_the_configured_limit_is_still_414() -> None:
    reader = RequestReader(max_line=1000, max_head=65536, max_field_line=65536)
    reader.feed(b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 414


def test_chunk_extension_limit_is_what_the_reader_is_given() -> None:
    body = b"1;" + b"e" * 40 + b"\r\nx\r\n0\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader = RequestReader(max_chunk_ext=16)
    reader.feed(head + body)
    reader.next_event()
    with pytest.raises(ProtocolError) as info:
        events(reader)
    assert (info.value.status, info.value.reason) == (400, "chunk extensions too long")
    reader = RequestReader(max_chunk_ext=64)
    reader.feed(head + body)
    reader.next_event()
    assert events(reader) == [Data(b"x"), EndOfMessage([])]


# --- request trailers ------------------------------------------------------------

FORBIDDEN_IN_TRAILERS = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Host",
    b"Connection",
    b"Keep-Alive",
    b"TE",
    b"Trailer",
    b"Upgrade",
    b"Authorization",
    b"Proxy-Authorization",
    b"Proxy-Authenticate",
    b"Proxy-Connection",
    b"Cookie",
    b"Set-Cookie",
    b"Expect",
    b"Range",
    b"If-Match",
    b"If-None-Match",
    b"If-Modified-Since",
    b"Max-Forwards",
    b"Cache-Control",
    b"Pragma",
    b"Content-Encoding",
    b"Content-Type",
    b"Content-Range",
    b"Content-Location",
    b"Location",
    b"Forwarded",
    b"X-Forwarded-For",
    b"Via",
    b"WWW-Authenticate",
    b"Age",
    b"Date",
    b"X-Anything-Else",
]


@pytest.mark.parametrize("name", FORBIDDEN_IN_TRAILERS)
def test_trailer_fields_that_frame_route_authenticate_or_control_are_dropped(
    name: bytes,
) -> None:
    assert forwardable_trailers([(name, b"v")]) == []
    assert forwardable_trailers([(name.upper(), b"v")]) == []
    assert forwardable_trailers([(name.lower(), b"v")]) == []


def test_integrity_trailers_are_forwarded_in_order_with_their_case() -> None:
    fields = [
        (b"Content-Digest", b"sha-256=:abc=:"),
        (b"Host", b"evil.example"),
        (b"repr-digest", b"sha-512=:def=:"),
        (b"Content-Length", b"0"),
        (b"Digest", b"SHA-256=xyz"),
    ]
    assert forwardable_trailers(fields) == [
        (b"Content-Digest", b"sha-256=:abc=:"),
        (b"repr-digest", b"sha-512=:def=:"),
        (b"Digest", b"SHA-256=xyz"),
    ]
    assert len(fields) == 5  # the argument is left untouched


def test_the_trailer_allowlist_holds_only_checksums() -> None:
    assert TRAILER_FIELDS == {b"content-digest", b"repr-digest", b"digest", b"content-md5"}


def test_a_smuggling_trailer_section_is_forwarded_as_an_empty_last_chunk() -> None:
    reader = RequestReader()
    reader.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\nContent-Length: 5\r\nHost: evil.example\r\n"
        b"Transfer-Encoding: chunked\r\nAuthorization: Basic Zm9vOmJhcg==\r\n\r\n"
    )
    assert isinstance(reader.next_event(), Request)
    *_, end = events(reader)
    assert isinstance(end, EndOfMessage) and len(end.trailers) == 4
    assert last_chunk(forwardable_trailers(end.trailers)) == b"0\r\n\r\n"


# --- every limit is a configuration key ------------------------------------------


PORT = '[[port]]\nlisten = "3128"\nmode = "forward"\n'


def test_new_limit_keys_are_read_from_the_limits_table() -> None:
    from tproxy_twist.config import loads

    limits = loads(
        "[limits]\nmax_response_header_size = 131072\nmax_chunk_extensions = 64\n"
        "max_request_line = 16384\n" + PORT
    ).limits
    assert (limits.max_response_header_size, limits.max_chunk_extensions) == (131072, 64)
    assert limits.max_request_line == 16384


@pytest.mark.parametrize(
    "key, value",
    [("max_response_header_size", 10), ("max_chunk_extensions", -1), ("max_request_line", 1)],
)
def test_out_of_range_limits_are_config_errors_naming_file_and_key(key: str, value: int) -> None:
    from tproxy_twist.config import ConfigError, loads

    with pytest.raises(ConfigError) as info:
        loads(f"[limits]\n{key} = {value}\n" + PORT, path="tproxy.toml")
    assert str(info.value).startswith(f"tproxy.toml: limits.{key}: must be from")


# --- Host is as strict as an absolute-form authority --------------------------------


@pytest.mark.parametrize(
    "value",
    [b"a.example:0", b"a.example:65536", b"a.example:123456", b":80", b":", b"[2001:db8::zz]"]
    + [b"[2001:db8::1]:0", b"[::1::2]", b"a%zz.example", b"a%2"],
)
def test_host_with_an_invalid_port_literal_or_escape_is_400(value: bytes) -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert (info.value.status, info.value.reason) == (400, "invalid Host header")


@pytest.mark.parametrize(
    "value", [b"a.example:1", b"a.example:65535", b"a.example:", b"[::1]:8080", b"a%2Eexample"]
)
def test_host_with_a_valid_port_literal_or_escape_is_accepted(value: bytes) -> None:
    from tproxy_twist.http.target import parse_authority

    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, Request) and head.get(b"host") == value
    parse_authority(value, 80)  # what framing accepts, routing accepts too


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="aZ09-._~!$&'()*+,;=%:[]fF", max_size=20),
        st.builds(
            lambda h, p: f"[{h}]{p}", st.ip_addresses(v=6).map(str), st.sampled_from(["", ":1"])
        ),
    ).map(str.encode)
)
def test_every_non_empty_host_framing_accepts_is_an_authority_routing_accepts(
    value: bytes,
) -> None:
    from tproxy_twist.http.target import parse_authority

    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    try:
        reader.next_event()
    except ProtocolError:
        return
    if value:
        parse_authority(value, 80)


@pytest.mark.parametrize("size", [65535, 65536, 65537, 70000])
def test_request_line_over_the_default_limits_is_414_however_it_arrives(size: int) -> None:
    line = b"GET /" + b"a" * size + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    for pieces in ([line], [line[:65536], line[65536:]], [line[:65537], line[65537:]]):
        reader = default_request_reader()
        with pytest.raises(ProtocolError) as info:
            for piece in pieces:
                reader.feed(piece)
                reader.next_event()
        assert info.value.status == 414
