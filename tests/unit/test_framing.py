"""Behaviour of the sans-IO HTTP/1.1 readers (tproxy_twist.http.framing)."""

from __future__ import annotations

import pytest

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

GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


# --- helpers ---------------------------------------------------------------------


def drive(reader: RequestReader | ResponseReader) -> list[object]:
    """Every event up to the first NEED_DATA, CLOSED, or PAUSED not after EndOfMessage.

    Calls start_next() after each EndOfMessage, so pipelined messages all show up.
    """
    events: list[object] = []
    while True:
        event = reader.next_event()
        events.append(event)
        if event is NEED_DATA or event is CLOSED:
            return events
        if event is PAUSED:
            if len(events) >= 2 and isinstance(events[-2], EndOfMessage):
                reader.start_next()
                continue
            return events


def read_request(data: bytes, **limits: int) -> tuple[Request, bytes, list[tuple[bytes, bytes]]]:
    """Parse one complete request: (head, body, trailers)."""
    reader = RequestReader(**limits)
    reader.feed(data)
    head = reader.next_event()
    assert isinstance(head, Request)
    body = []
    while True:
        event = reader.next_event()
        if isinstance(event, EndOfMessage):
            return head, b"".join(body), event.trailers
        assert isinstance(event, Data), event
        body.append(event.data)


def read_response(
    data: bytes, method: bytes = b"GET", *, eof: bool = False
) -> tuple[Response, bytes, list[tuple[bytes, bytes]]]:
    """Parse one complete (final) response to ``method``: (head, body, trailers)."""
    reader = ResponseReader()
    reader.expect(method)
    reader.feed(data)
    if eof:
        reader.feed_eof()
    head = reader.next_event()
    assert isinstance(head, Response)
    body = []
    while True:
        event = reader.next_event()
        if isinstance(event, EndOfMessage):
            return head, b"".join(body), event.trailers
        assert isinstance(event, Data), event
        body.append(event.data)


def drive_first(method: bytes, data: bytes) -> list[object]:
    reader = ResponseReader()
    reader.expect(method)
    reader.feed(data)
    return drive(reader)


def request_error(data: bytes, *, eof: bool = False, **limits: int) -> ProtocolError:
    reader = RequestReader(**limits)
    reader.feed(data)
    if eof:
        reader.feed_eof()
    with pytest.raises(ProtocolError) as info:
        drive(reader)
    return info.value


def response_error(data: bytes, method: bytes = b"GET", *, eof: bool = False) -> ProtocolError:
    reader = ResponseReader()
    reader.expect(method)
    reader.feed(data)
    if eof:
        reader.feed_eof()
    with pytest.raises(ProtocolError) as info:
        drive(reader)
    return info.value


def req(*fields: bytes, line: bytes = b"GET / HTTP/1.1", body: bytes = b"") -> bytes:
    """A request with Host plus ``fields`` (each b"Name: value")."""
    return b"\r\n".join([line, b"Host: example.com", *fields]) + b"\r\n\r\n" + body


def resp(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK", body: bytes = b"") -> bytes:
    return b"\r\n".join([line, *fields]) + b"\r\n\r\n" + body


# --- request line ----------------------------------------------------------------


def test_simple_get_is_parsed_with_field_names_in_original_case() -> None:
    head, body, trailers = read_request(req(b"X-Custom-Thing:  value with  spaces \t"))
    assert (head.method, head.target, head.version) == (b"GET", b"/", b"HTTP/1.1")
    assert head.headers == [(b"Host", b"example.com"), (b"X-Custom-Thing", b"value with  spaces")]
    assert head.body == "none"
    assert head.content_length is None
    assert head.keep_alive is True
    assert head.expect_continue is False
    assert body == b""
    assert trailers == []


def test_request_without_body_is_followed_by_end_of_message_then_paused() -> None:
    reader = RequestReader()
    reader.feed(GET)
    assert isinstance(reader.next_event(), Request)
    assert reader.next_event() == EndOfMessage([])
    assert reader.next_event() is PAUSED
    assert reader.next_event() is PAUSED


def test_empty_lines_before_the_request_line_are_ignored() -> None:
    head, _, _ = read_request(b"\r\n\r\n" + GET)
    assert head.target == b"/"


def test_endless_empty_lines_before_the_request_line_are_rejected() -> None:
    error = request_error(b"\r\n" * 100, max_line=64)
    assert error.status == 400
    assert "empty lines" in error.reason


def test_bare_lf_line_endings_are_rejected_with_400_as_soon_as_seen() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\nHost: exa")  # head incomplete: no need to wait for it
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 400
    assert "bare LF" in info.value.reason


def test_bare_lf_inside_a_complete_head_is_rejected() -> None:
    error = request_error(b"GET / HTTP/1.1\r\nHost: example.com\nX: y\r\n\r\n")
    assert (error.status, "bare LF" in error.reason) == (400, True)


def test_bare_lf_split_across_feeds_is_rejected() -> None:
    reader = RequestReader()
    for piece in (b"GET / HTTP/1.1\r", b"\nHost: a\r\nX: 1", b"\n"):
        reader.feed(piece)
        try:
            reader.next_event()
        except ProtocolError as e:
            assert "bare LF" in e.reason
            return
    pytest.fail("bare LF not detected")


def test_bare_cr_in_a_field_value_is_rejected() -> None:
    error = request_error(req(b"X: a\rb"))
    assert error.status == 400
    assert "bare CR" in error.reason


@pytest.mark.parametrize("char", [b"\x00", b"\x01", b"\x0b", b"\x1f", b"\x7f"])
def test_control_characters_in_a_field_value_are_rejected(char: bytes) -> None:
    error = request_error(req(b"X: a" + char + b"b"))
    assert (error.status, error.reason) == (400, "control character in header field")


def test_control_character_in_the_request_line_is_rejected() -> None:
    error = request_error(req(line=b"GET /a\x00b HTTP/1.1"))
    assert (error.status, error.reason) == (400, "control character in request line")


def test_htab_and_obs_text_in_field_values_are_allowed() -> None:
    head, _, _ = read_request(req(b"X: a\tb \xe9t\xe9"))
    assert head.get(b"x") == b"a\tb \xe9t\xe9"


@pytest.mark.parametrize(
    "line",
    [
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /",
        b"GET / HTTP/1.1 extra",
        b" GET / HTTP/1.1",
        b"GET\t/ HTTP/1.1",
    ],
)
def test_malformed_request_lines_are_rejected_with_400(line: bytes) -> None:
    assert request_error(req(line=line)).status == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"])
def test_other_http_versions_are_rejected_with_505(version: bytes) -> None:
    assert request_error(req(line=b"GET / " + version)).status == 505


@pytest.mark.parametrize("version", [b"HTTP/1.10", b"http/1.1", b"HTTP/1", b"HTTP/1.1\t", b"FOO"])
def test_garbage_http_versions_are_rejected_with_400(version: bytes) -> None:
    assert request_error(req(line=b"GET / " + version)).status == 400


@pytest.mark.parametrize("method", [b"GE(T", b"G\xc3\xa9T", b"GET/", b"[GET]"])
def test_method_must_be_a_token(method: bytes) -> None:
    error = request_error(req(line=method + b" / HTTP/1.1"))
    assert (error.status, error.reason) == (400, "invalid method")


@pytest.mark.parametrize(
    "line",
    [
        b"GET /path?q=1 HTTP/1.1",
        b"GET http://example.com/x HTTP/1.1",
        b"CONNECT example.com:443 HTTP/1.1",
        b"CONNECT [2001:db8::1]:443 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"PURGE /x HTTP/1.1",
    ],
)
def test_each_request_target_form_is_accepted_for_its_method(line: bytes) -> None:
    method, target, _ = line.split(b" ")
    head, _, _ = read_request(req(line=line))
    assert (head.method, head.target) == (method, target)


@pytest.mark.parametrize(
    "line",
    [
        b"GET * HTTP/1.1",
        b"CONNECT /x HTTP/1.1",
        b"CONNECT example.com HTTP/1.1",
        b"GET example.com/x HTTP/1.1",
        b"GET ?q HTTP/1.1",
        b"GET  HTTP/1.1",
    ],
)
def test_request_target_in_a_form_the_method_does_not_allow_is_rejected(line: bytes) -> None:
    assert request_error(req(line=line)).status == 400


def test_request_line_longer_than_max_line_is_rejected_with_414() -> None:
    line = b"GET /" + b"a" * 100 + b" HTTP/1.1"
    assert request_error(req(line=line), max_line=100).status == 414


def test_request_line_longer_than_max_line_is_rejected_before_it_ends() -> None:
    reader = RequestReader(max_line=100)
    reader.feed(b"GET /" + b"a" * 200)
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 414


def test_long_head_with_a_short_request_line_is_not_mistaken_for_a_long_line() -> None:
    reader = RequestReader(max_line=40)
    reader.feed(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\nX-B: 2\r\nX-")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"C: 3\r\n\r\n")
    head = reader.next_event()
    assert isinstance(head, Request)
    assert head.get(b"x-c") == b"3"


def test_request_line_of_exactly_max_line_is_accepted() -> None:
    line = b"GET /" + b"a" * 86 + b" HTTP/1.1"
    assert len(line) == 100
    head, _, _ = read_request(req(line=line), max_line=100)
    assert len(head.target) == 87


# --- header section limits -------------------------------------------------------


def test_header_section_larger_than_max_head_is_rejected_with_431() -> None:
    error = request_error(req(*[b"X-%d: %s" % (i, b"v" * 50) for i in range(30)]), max_head=1024)
    assert (error.status, error.reason) == (431, "header section too large")


def test_header_section_larger_than_max_head_is_rejected_before_it_ends() -> None:
    reader = RequestReader(max_head=1024)
    reader.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 500 + b"\r\n" * 1)
    assert reader.next_event() is NEED_DATA
    reader.feed(b"Y: " + b"v" * 600)
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 431


def test_header_section_of_exactly_max_head_is_accepted() -> None:
    data = req(b"X: ")
    data = req(b"X: " + b"v" * (300 - len(data)))
    assert len(data) == 300
    head, _, _ = read_request(data, max_head=300)
    assert head.get(b"x") == b"v" * (300 - len(req(b"X: ")))


def test_more_than_max_fields_is_rejected_with_431() -> None:
    fields = [b"X-%d: v" % i for i in range(10)]
    assert request_error(req(*fields), max_fields=10).status == 431  # plus Host: 11
    head, _, _ = read_request(req(*fields[:9]), max_fields=10)
    assert len(head.headers) == 10


def test_field_line_longer_than_max_line_is_rejected_with_431() -> None:
    error = request_error(req(b"X: " + b"v" * 200), max_line=100)
    assert (error.status, error.reason) == (431, "header field line too long")


# --- field syntax ----------------------------------------------------------------


def test_whitespace_between_field_name_and_colon_is_rejected_with_400() -> None:
    for line in (b"Content-Length : 5", b"X\t: y"):
        error = request_error(req(line))
        assert (error.status, error.reason) == (400, "whitespace between field name and colon")


def test_obs_fold_continuation_line_is_rejected_with_400() -> None:
    for fold in (b" folded", b"\tfolded: too"):
        error = request_error(req(b"X: a", fold))
        assert error.status == 400
        assert "obs-fold" in error.reason


def test_field_line_without_colon_is_rejected() -> None:
    error = request_error(req(b"NoColonHere"))
    assert (error.status, error.reason) == (400, "header field line without a colon")


@pytest.mark.parametrize("line", [b": empty name", b"X(y): z", b"\xe9t\xe9: x", b"A/B: c"])
def test_field_name_that_is_not_a_token_is_rejected(line: bytes) -> None:
    error = request_error(req(line))
    assert (error.status, error.reason) == (400, "invalid header field name")


def test_empty_field_value_is_kept_as_empty_bytes() -> None:
    head, _, _ = read_request(req(b"X-Empty:", b"X-Blank:   "))
    assert head.get_all(b"x-empty") == [b""]
    assert head.get(b"x-blank") == b""


def test_get_and_get_all_match_names_case_insensitively_in_order() -> None:
    head, _, _ = read_request(req(b"Accept: a", b"ACCEPT: b", b"accept: c"))
    assert head.get(b"accept") == b"a"
    assert head.get_all(b"accept") == [b"a", b"b", b"c"]
    assert head.get(b"missing") is None
    assert head.get_all(b"missing") == []


def test_http11_request_without_host_is_rejected() -> None:
    error = request_error(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert (error.status, error.reason) == (400, "missing Host header")


def test_request_with_two_host_fields_is_rejected() -> None:
    error = request_error(req(b"host: other.example"))
    assert (error.status, error.reason) == (400, "multiple Host headers")


@pytest.mark.parametrize("value", [b"a b", b"a/b", b"user@host", b"host:80x", b"[::1"])
def test_host_value_that_is_not_host_and_port_is_rejected(value: bytes) -> None:
    error = request_error(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert (error.status, error.reason) == (400, "invalid Host header")


@pytest.mark.parametrize("value", [b"example.com:8080", b"[2001:db8::1]:80", b"10.0.0.1", b""])
def test_host_value_forms_are_accepted(value: bytes) -> None:
    head, _, _ = read_request(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert head.get(b"host") == value


def test_http10_request_without_host_is_accepted() -> None:
    head, _, _ = read_request(b"GET / HTTP/1.0\r\n\r\n")
    assert head.version == b"HTTP/1.0"
    assert head.headers == []


# --- connection management -------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", None, True),
        (b"HTTP/1.1", b"close", False),
        (b"HTTP/1.1", b"Keep-Alive, CLOSE", False),
        (b"HTTP/1.1", b"upgrade", True),
        (b"HTTP/1.0", None, False),
        (b"HTTP/1.0", b"keep-alive", True),
        (b"HTTP/1.0", b"Keep-Alive", True),
        (b"HTTP/1.0", b"keep-alive, close", False),
    ],
)
def test_keep_alive_follows_version_and_connection_tokens(
    version: bytes, connection: bytes | None, keep_alive: bool
) -> None:
    fields = [b"Connection: " + connection] if connection else []
    head, _, _ = read_request(req(*fields, line=b"GET / " + version))
    assert head.keep_alive is keep_alive


def test_expect_100_continue_is_detected_case_insensitively() -> None:
    head, _, _ = read_request(req(b"Expect: 100-Continue", b"Content-Length: 0"))
    assert head.expect_continue is True


def test_expect_100_continue_is_ignored_in_http10() -> None:
    head, _, _ = read_request(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
    assert head.expect_continue is False


def test_other_expectations_do_not_set_expect_continue() -> None:
    head, _, _ = read_request(req(b"Expect: something-else"))
    assert head.expect_continue is False


# --- Content-Length --------------------------------------------------------------


def test_content_length_body_is_framed_by_length() -> None:
    head, body, _ = read_request(req(b"Content-Length: 5", body=b"hello"))
    assert (head.body, head.content_length, body) == ("length", 5, b"hello")


def test_content_length_zero_means_no_body_and_immediate_end_of_message() -> None:
    reader = RequestReader()
    reader.feed(req(b"Content-Length: 0", line=b"POST / HTTP/1.1"))
    head = reader.next_event()
    assert isinstance(head, Request)
    assert (head.body, head.content_length) == ("none", 0)
    assert reader.next_event() == EndOfMessage([])


@pytest.mark.parametrize(
    "fields",
    [
        [b"Content-Length: 5, 5"],
        [b"Content-Length: 5", b"content-length: 5"],
        [b"Content-Length: 5 ,5", b"Content-Length: 5"],
    ],
)
def test_repeated_identical_content_length_is_accepted_and_made_single(
    fields: list[bytes],
) -> None:
    head, body, _ = read_request(req(*fields, body=b"hello"))
    assert (head.content_length, body) == (5, b"hello")
    assert [v for n, v in head.headers if n.lower() == b"content-length"] == [b"5"]


@pytest.mark.parametrize(
    "fields",
    [[b"Content-Length: 5, 6"], [b"Content-Length: 5", b"Content-Length: 6"]],
)
def test_conflicting_content_length_is_rejected_with_400(fields: list[bytes]) -> None:
    error = request_error(req(*fields, body=b"hello!"))
    assert (error.status, error.reason) == (400, "conflicting Content-Length headers")


@pytest.mark.parametrize("value", [b"-1", b"+5", b"5a", b"0x10", b"", b"1 2", b"5,", b"\xb9"])
def test_invalid_content_length_is_rejected_with_400(value: bytes) -> None:
    error = request_error(req(b"Content-Length: " + value))
    assert (error.status, error.reason) == (400, "invalid Content-Length")


def test_huge_content_length_is_accepted_as_an_int() -> None:
    reader = RequestReader()
    reader.feed(req(b"Content-Length: 123456789012345678901234567890", line=b"PUT / HTTP/1.1"))
    head = reader.next_event()
    assert isinstance(head, Request)
    assert head.content_length == 123456789012345678901234567890


def test_content_length_with_absurdly_many_digits_is_rejected_with_413() -> None:
    assert request_error(req(b"Content-Length: " + b"9" * 100)).status == 413


def test_content_length_with_leading_zeros_is_read_as_decimal() -> None:
    head, body, _ = read_request(req(b"Content-Length: 0" * 1 + b"0003", body=b"abc"))
    assert (head.content_length, body) == (3, b"abc")


# --- Transfer-Encoding -----------------------------------------------------------


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_transfer_encoding_chunked_is_recognised_case_insensitively(value: bytes) -> None:
    head, body, _ = read_request(req(b"Transfer-Encoding: " + value, body=b"3\r\nabc\r\n0\r\n\r\n"))
    assert (head.body, head.content_length, body) == ("chunked", None, b"abc")


@pytest.mark.parametrize(
    "fields",
    [
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
    ],
)
def test_unknown_transfer_coding_before_chunked_is_rejected_with_501(fields: list[bytes]) -> None:
    assert request_error(req(*fields)).status == 501


@pytest.mark.parametrize("value", [b"chunked, gzip", b"gzip", b"identity", b"chunked;q=1", b""])
def test_transfer_encoding_without_final_chunked_is_rejected_with_400(value: bytes) -> None:
    error = request_error(req(b"Transfer-Encoding: " + value))
    assert (error.status, error.reason) == (400, "chunked is not the final transfer coding")


def test_chunked_applied_twice_is_rejected_with_400() -> None:
    assert request_error(req(b"Transfer-Encoding: chunked, chunked")).status == 400


def test_transfer_encoding_in_http10_request_is_rejected_with_400() -> None:
    error = request_error(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (error.status, error.reason) == (400, "Transfer-Encoding in an HTTP/1.0 request")


@pytest.mark.parametrize(
    "fields",
    [
        [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
        [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
        [b"Content-Length: 0", b"Transfer-Encoding: gzip"],
    ],
)
def test_request_with_both_transfer_encoding_and_content_length_is_rejected(
    fields: list[bytes],
) -> None:
    error = request_error(req(*fields, body=b"0\r\n\r\n"))
    assert (error.status, error.reason) == (400, "both Transfer-Encoding and Content-Length")


# --- chunked bodies --------------------------------------------------------------


def test_chunked_body_with_extensions_and_trailers_is_decoded() -> None:
    body = (
        b"4;name=value\r\nWiki\r\n"
        b'5 ; flag ; q="quoted ;\\" value"\r\npedia\r\n'
        b"E\r\n in\r\n\r\nchunks.\r\n"
        b"0;last\r\nExpires: never\r\nX-Checksum: abc\r\n\r\n"
    )
    head, data, trailers = read_request(req(b"Transfer-Encoding: chunked", body=body))
    assert data == b"Wikipedia in\r\n\r\nchunks."
    assert trailers == [(b"Expires", b"never"), (b"X-Checksum", b"abc")]


def test_chunk_size_is_hex_with_leading_zeros_allowed() -> None:
    body = b"000A\r\n0123456789\r\n1f\r\n" + b"x" * 31 + b"\r\n0000\r\n\r\n"
    _, data, _ = read_request(req(b"Transfer-Encoding: chunked", body=body))
    assert data == b"0123456789" + b"x" * 31


def test_partial_chunk_data_is_streamed_without_waiting_for_the_whole_chunk() -> None:
    reader = RequestReader()
    reader.feed(req(b"Transfer-Encoding: chunked", body=b"a\r\n0123"))
    assert isinstance(reader.next_event(), Request)
    assert reader.next_event() == Data(b"0123")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"45")
    assert reader.next_event() == Data(b"45")
    reader.feed(b"6789\r")
    assert reader.next_event() == Data(b"6789")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\n0\r\n\r\n")
    assert reader.next_event() == EndOfMessage([])


@pytest.mark.parametrize(
    ("chunk_line", "reason"),
    [
        (b"x", "invalid chunk size"),
        (b"0x10", "invalid chunk size"),
        (b"-1", "invalid chunk size"),
        (b"+a", "invalid chunk size"),
        (b"", "invalid chunk size"),
        (b"1_0", "invalid chunk size"),
        (b"a ", "invalid chunk size"),
        (b" a", "invalid chunk size"),
        (b"1" * 17, "chunk size too long"),
        (b"a;", "malformed chunk extension"),
        (b"a;=x", "malformed chunk extension"),
        (b'a;n="unterminated', "malformed chunk extension"),
        (b"a;n=v w", "malformed chunk extension"),
        (b"a;n\x01", "malformed chunk extension"),
    ],
)
def test_malformed_chunk_size_lines_are_rejected_with_400(chunk_line: bytes, reason: str) -> None:
    error = request_error(
        req(b"Transfer-Encoding: chunked", body=chunk_line + b"\r\n0123456789\r\n0\r\n\r\n")
    )
    assert (error.status, error.reason) == (400, reason)


def test_sixteen_hex_digit_chunk_size_is_accepted() -> None:
    reader = RequestReader()
    reader.feed(req(b"Transfer-Encoding: chunked", body=b"0000000000000003\r\nabc\r\n0\r\n\r\n"))
    assert [type(e) for e in drive(reader)[:4]] == [Request, Data, EndOfMessage, type(PAUSED)]


def test_chunk_extensions_longer_than_max_chunk_ext_are_rejected_with_400() -> None:
    body = b"3;x=" + b"y" * 100 + b"\r\nabc\r\n0\r\n\r\n"
    error = request_error(req(b"Transfer-Encoding: chunked", body=body), max_chunk_ext=64)
    assert (error.status, error.reason) == (400, "chunk extensions too long")
    # Also while the chunk-size line is still incomplete.
    error = request_error(req(b"Transfer-Encoding: chunked", body=body[:90]), max_chunk_ext=64)
    assert (error.status, error.reason) == (400, "chunk extensions too long")


def test_chunk_data_not_followed_by_crlf_is_rejected_with_400() -> None:
    for bad in (b"3\r\nabcX\r\n0\r\n\r\n", b"3\r\nabc\n0\r\n\r\n", b"3\r\nabc\rX0\r\n\r\n"):
        error = request_error(req(b"Transfer-Encoding: chunked", body=bad))
        assert (error.status, error.reason) == (400, "chunk data not followed by CRLF")


def test_chunk_size_line_arriving_in_pieces_is_parsed_once_complete() -> None:
    reader = RequestReader()
    reader.feed(req(b"Transfer-Encoding: chunked", body=b"1"))
    assert isinstance(reader.next_event(), Request)
    assert reader.next_event() is NEED_DATA
    reader.feed(b"0;ext=")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"1\r")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\n" + b"z" * 16 + b"\r\n0\r\n\r\n")
    assert reader.next_event() == Data(b"z" * 16)
    assert reader.next_event() == EndOfMessage([])


def test_chunk_extension_just_over_max_chunk_ext_is_rejected() -> None:
    body = b"3;" + b"e" * 9 + b"\r\nabc\r\n0\r\n\r\n"
    error = request_error(req(b"Transfer-Encoding: chunked", body=body), max_chunk_ext=8)
    assert (error.status, error.reason) == (400, "chunk extensions too long")


def test_chunk_size_line_without_crlf_is_rejected_when_too_long() -> None:
    error = request_error(req(b"Transfer-Encoding: chunked", body=b"1" * 40), max_chunk_ext=8)
    assert (error.status, error.reason) == (400, "chunk size too long")


def test_chunk_data_followed_by_a_single_wrong_byte_is_rejected_at_once() -> None:
    error = request_error(req(b"Transfer-Encoding: chunked", body=b"3\r\nabcX"))
    assert (error.status, error.reason) == (400, "chunk data not followed by CRLF")


@pytest.mark.parametrize(
    "body", [b"3\nabc\r\n0\r\n\r\n", b"3\n", b"3;a\nb\r\nabc\r\n0\r\n\r\n", b"0\r\n\n"]
)
def test_bare_lf_in_chunk_framing_is_rejected(body: bytes) -> None:
    error = request_error(req(b"Transfer-Encoding: chunked", body=body))
    assert (error.status, "bare LF" in error.reason) == (400, True)


def test_trailers_arriving_in_pieces_are_parsed_once_complete() -> None:
    reader = RequestReader()
    reader.feed(req(b"Transfer-Encoding: chunked", body=b"0\r\n"))
    assert isinstance(reader.next_event(), Request)
    assert reader.next_event() is NEED_DATA
    reader.feed(b"X")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"-A: 1\r")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\nX-B: 2\r\n")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"\r\n")
    assert reader.next_event() == EndOfMessage([(b"X-A", b"1"), (b"X-B", b"2")])


def test_bare_lf_in_chunk_size_line_is_rejected() -> None:
    error = request_error(req(b"Transfer-Encoding: chunked", body=b"3\nabc\r\n0\r\n\r\n"))
    assert (error.status, "bare LF" in error.reason) == (400, True)


def test_trailer_fields_follow_the_header_field_rules() -> None:
    for trailer in (b"X : y", b" folded", b"X: a\x00b", b"NoColon"):
        body = b"0\r\nA: b\r\n" + trailer + b"\r\n\r\n"
        assert request_error(req(b"Transfer-Encoding: chunked", body=body)).status == 400


def test_too_many_trailer_fields_are_rejected_with_431() -> None:
    body = b"0\r\n" + b"".join(b"T%d: v\r\n" % i for i in range(5)) + b"\r\n"
    assert request_error(req(b"Transfer-Encoding: chunked", body=body), max_fields=4).status == 431


def test_oversized_trailer_section_is_rejected_with_431() -> None:
    body = b"0\r\nT: " + b"v" * 2000
    error = request_error(req(b"Transfer-Encoding: chunked", body=body), max_head=1024)
    assert error.status == 431


# --- body streaming and pipelining -------------------------------------------------


def test_content_length_body_data_is_the_fed_bytes_object_itself() -> None:
    reader = RequestReader()
    reader.feed(req(b"Content-Length: 10", line=b"POST / HTTP/1.1"))
    assert isinstance(reader.next_event(), Request)
    piece = b"abcdef"
    reader.feed(piece)
    event = reader.next_event()
    assert isinstance(event, Data)
    assert event.data is piece
    reader.feed(b"ghij")
    assert reader.next_event() == Data(b"ghij")
    assert reader.next_event() == EndOfMessage([])


def test_bytes_after_a_body_wait_until_start_next_is_called() -> None:
    reader = RequestReader()
    reader.feed(req(b"Content-Length: 3", body=b"abc") + b"\x00garbage that is not HTTP\r\n\r\n")
    events = [reader.next_event() for _ in range(5)]
    assert events[1:] == [Data(b"abc"), EndOfMessage([]), PAUSED, PAUSED]
    assert not reader.idle
    reader.start_next()
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_pipelined_requests_in_one_feed_are_parsed_in_order() -> None:
    reader = RequestReader()
    reader.feed(
        req(line=b"GET /1 HTTP/1.1")
        + req(b"Content-Length: 4", line=b"POST /2 HTTP/1.1", body=b"body")
        + req(b"Transfer-Encoding: chunked", line=b"PUT /3 HTTP/1.1", body=b"2\r\nhi\r\n0\r\n\r\n")
        + req(b"Connection: close", line=b"GET /4 HTTP/1.1")
    )
    events = drive(reader)
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/1", b"/2", b"/3", b"/4"]
    assert [e.data for e in events if isinstance(e, Data)] == [b"body", b"hi"]
    assert sum(isinstance(e, EndOfMessage) for e in events) == 4
    assert heads[3].keep_alive is False
    assert events[-1] is NEED_DATA
    assert reader.idle


def test_start_next_before_end_of_message_is_a_programming_error() -> None:
    reader = RequestReader()
    with pytest.raises(RuntimeError):
        reader.start_next()
    reader.feed(req(b"Content-Length: 3"))
    reader.next_event()
    with pytest.raises(RuntimeError):
        reader.start_next()


def test_head_arriving_one_byte_at_a_time_is_parsed_once_complete() -> None:
    data = req(b"Content-Length: 2", b"User-Agent: test", body=b"ok")
    reader = RequestReader()
    events: list[object] = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
            if event is PAUSED:
                break
    assert isinstance(events[0], Request)
    assert events[1:] == [Data(b"o"), Data(b"k"), EndOfMessage([]), PAUSED]


def test_partial_data_left_in_the_buffer_is_joined_with_the_next_feeds() -> None:
    reader = RequestReader()
    first = req(b"Content-Length: 3", body=b"abc")
    second = req(b"Content-Length: 5", line=b"POST /2 HTTP/1.1", body=b"hello")
    reader.feed(first + second[:10])
    events = drive(reader)
    assert events[-1] is NEED_DATA  # the start of the second request is buffered
    for i in range(10, len(second), 7):
        reader.feed(second[i : i + 7])
        events += drive(reader)
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/", b"/2"]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abchello"


def test_pipelined_heads_split_across_feeds_are_parsed_in_order() -> None:
    reader = RequestReader()
    reader.feed(b"GET /1 HTTP/1.1\r\nHo")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"st: a\r\n\r\nGET /2 HT")
    first = drive(reader)
    reader.feed(b"TP/1.1\r\nHost: b\r\n\r\n")
    second = drive(reader)
    assert [e.target for e in first + second if isinstance(e, Request)] == [b"/1", b"/2"]
    assert reader.idle


def test_take_buffered_returns_and_clears_the_unparsed_bytes() -> None:
    reader = RequestReader()
    reader.feed(req(line=b"CONNECT example.com:443 HTTP/1.1") + b"\x16\x03\x01 tls hello")
    head = reader.next_event()
    assert isinstance(head, Request)
    assert reader.next_event() == EndOfMessage([])
    reader.feed(b" more")
    assert reader.take_buffered() == b"\x16\x03\x01 tls hello more"
    assert reader.take_buffered() == b""
    assert reader.idle


def test_feed_accepts_empty_bytes_and_copies_mutable_buffers() -> None:
    reader = RequestReader()
    reader.feed(b"")
    assert reader.next_event() is NEED_DATA
    chunk = bytearray(GET)
    reader.feed(chunk)
    chunk[:3] = b"XXX"
    head = reader.next_event()
    assert isinstance(head, Request)
    assert head.method == b"GET"


def test_idle_is_true_only_between_messages_with_nothing_buffered() -> None:
    reader = RequestReader()
    assert reader.idle
    reader.feed(b"GET / HT")
    assert not reader.idle
    reader.feed(b"TP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
    reader.next_event()
    assert not reader.idle
    reader.feed(b"ab")
    reader.next_event()
    reader.next_event()
    assert reader.idle
    reader.start_next()
    assert reader.idle


# --- end of input ----------------------------------------------------------------


def test_eof_between_messages_is_a_clean_close() -> None:
    reader = RequestReader()
    reader.feed(GET)
    reader.feed_eof()
    events = drive(reader)
    assert events[-1] is CLOSED
    assert reader.next_event() is CLOSED


def test_eof_on_a_fresh_connection_is_a_clean_close() -> None:
    reader = RequestReader()
    reader.feed_eof()
    assert reader.next_event() is CLOSED


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"G",
        req(b"Content-Length: 10", body=b"abc"),
        req(b"Transfer-Encoding: chunked", body=b"a\r\nabc"),
        req(b"Transfer-Encoding: chunked", body=b"3\r\nabc\r\n"),
        req(b"Transfer-Encoding: chunked", body=b"0\r\nTrailer: x\r\n"),
    ],
)
def test_eof_in_the_middle_of_a_message_is_rejected_with_400(data: bytes) -> None:
    error = request_error(data, eof=True)
    assert (error.status, error.reason) == (400, "connection closed mid-message")


def test_feeding_after_eof_is_a_programming_error() -> None:
    reader = RequestReader()
    reader.feed_eof()
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_protocol_errors_are_sticky() -> None:
    reader = RequestReader()
    reader.feed(b"BAD\r\n\r\n")
    with pytest.raises(ProtocolError) as first:
        reader.next_event()
    with pytest.raises(ProtocolError) as second:
        reader.next_event()
    assert second.value is first.value


def test_protocol_error_carries_status_and_reason() -> None:
    error = ProtocolError(431, "too many header fields")
    assert (error.status, error.reason) == (431, "too many header fields")
    assert str(error) == "431 too many header fields"


# --- responses -------------------------------------------------------------------


def test_response_with_content_length_is_framed_by_length() -> None:
    head, body, _ = read_response(resp(b"Content-Length: 5", b"Server: x", body=b"hello"))
    assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 200, b"OK")
    assert (head.body, head.content_length, head.keep_alive) == ("length", 5, True)
    assert head.headers == [(b"Content-Length", b"5"), (b"Server", b"x")]
    assert body == b"hello"


def test_response_to_head_has_no_body_despite_content_length() -> None:
    reader = ResponseReader()
    reader.expect(b"HEAD")
    reader.expect(b"GET")
    reader.feed(resp(b"Content-Length: 100") + resp(b"Content-Length: 2", body=b"ok"))
    events = drive(reader)
    first, second = (e for e in events if isinstance(e, Response))
    assert (first.body, first.get(b"content-length")) == ("none", b"100")
    assert second.body == "length"
    assert [e for e in events if isinstance(e, Data)] == [Data(b"ok")]


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_204_and_304_responses_have_no_body(status: bytes) -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(resp(b"Content-Length: 10", line=b"HTTP/1.1 " + status) + b"next")
    head = reader.next_event()
    assert isinstance(head, Response)
    assert head.body == "none"
    assert reader.next_event() == EndOfMessage([])
    assert reader.take_buffered() == b"next"


def test_interim_responses_do_not_answer_the_request() -> None:
    reader = ResponseReader()
    reader.expect(b"HEAD")
    reader.feed(
        resp(line=b"HTTP/1.1 100 Continue")
        + resp(b"Link: </style.css>; rel=preload", line=b"HTTP/1.1 103 Early Hints")
        + resp(b"Content-Length: 10")  # still answers the HEAD: no body
    )
    events = drive(reader)
    heads = [e for e in events if isinstance(e, Response)]
    assert [(h.status, h.interim, h.body) for h in heads] == [
        (100, True, "none"),
        (103, True, "none"),
        (200, False, "none"),
    ]
    assert heads[1].get(b"link") == b"</style.css>; rel=preload"
    assert sum(isinstance(e, EndOfMessage) for e in events) == 3
    assert events[-1] is NEED_DATA


def test_101_switching_protocols_turns_the_connection_into_a_tunnel() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(
        resp(b"Upgrade: websocket", b"Connection: Upgrade", line=b"HTTP/1.1 101 Switching")
        + b"\x81\x05hello"
    )
    head = reader.next_event()
    assert isinstance(head, Response)
    assert (head.status, head.interim, head.body, head.keep_alive) == (101, False, "tunnel", False)
    assert [reader.next_event() for _ in range(3)] == [PAUSED] * 3
    reader.feed(b"more")
    assert reader.next_event() is PAUSED
    assert reader.take_buffered() == b"\x81\x05hellomore"
    with pytest.raises(RuntimeError):
        reader.start_next()


def test_2xx_to_connect_is_a_tunnel_even_with_content_length() -> None:
    head, *_ = drive_first(
        b"CONNECT", resp(b"Content-Length: 5", line=b"HTTP/1.1 200 Connection established")
    )
    assert (head.body, head.content_length) == ("tunnel", None)


def test_101_is_a_tunnel_even_in_answer_to_head() -> None:
    head, *_ = drive_first(b"HEAD", resp(b"Upgrade: h2c", line=b"HTTP/1.1 101 Switching"))
    assert head.body == "tunnel"


def test_204_to_connect_opens_the_tunnel() -> None:
    events = drive_first(b"CONNECT", resp(line=b"HTTP/1.1 204 No Content") + b"tunnel bytes")
    assert events[0].body == "tunnel"
    assert events[1:] == [PAUSED]


def test_non_2xx_to_connect_is_framed_normally() -> None:
    head, body, _ = read_response(
        resp(
            b"Content-Length: 6", line=b"HTTP/1.1 407 Proxy Authentication Required", body=b"denied"
        ),
        b"CONNECT",
    )
    assert (head.body, body) == ("length", b"denied")


def test_chunked_response_is_decoded() -> None:
    head, body, trailers = read_response(
        resp(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")
    )
    assert (head.body, head.content_length, head.keep_alive) == ("chunked", None, True)
    assert (body, trailers) == (b"hello", [(b"X-T", b"1")])


def test_http10_response_with_transfer_encoding_is_not_kept_alive() -> None:
    head, body, _ = read_response(
        resp(
            b"Transfer-Encoding: chunked",
            b"Connection: keep-alive",
            line=b"HTTP/1.0 200 OK",
            body=b"2\r\nhi\r\n0\r\n\r\n",
        )
    )
    assert (head.body, head.keep_alive, body) == ("chunked", False, b"hi")


def test_response_with_repeated_identical_content_length_gets_a_single_one() -> None:
    head, body, _ = read_response(
        resp(b"Content-Length: 2", b"Server: x", b"Content-Length: 2", body=b"hi")
    )
    assert head.headers == [(b"Content-Length", b"2"), (b"Server", b"x")]
    assert (head.content_length, body) == (2, b"hi")


def test_response_with_transfer_encoding_and_content_length_drops_content_length() -> None:
    head, body, _ = read_response(
        resp(b"Content-Length: 99", b"Transfer-Encoding: chunked", body=b"2\r\nhi\r\n0\r\n\r\n")
    )
    assert (head.body, head.content_length, head.keep_alive) == ("chunked", None, False)
    assert head.headers == [(b"Transfer-Encoding", b"chunked")]
    assert body == b"hi"


@pytest.mark.parametrize(
    "value", [b"gzip, chunked", b"gzip", b"chunked, gzip", b"chunked, chunked"]
)
def test_response_transfer_codings_other_than_chunked_are_rejected_with_502(value: bytes) -> None:
    assert response_error(resp(b"Transfer-Encoding: " + value)).status == 502


def test_response_without_framing_is_read_until_close() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(resp(body=b"part one"))
    head = reader.next_event()
    assert isinstance(head, Response)
    assert (head.body, head.keep_alive, head.content_length) == ("close", False, None)
    assert reader.next_event() == Data(b"part one")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"part two")
    assert reader.next_event() == Data(b"part two")
    reader.feed_eof()
    assert reader.next_event() == EndOfMessage([])
    reader.start_next()
    assert reader.next_event() is CLOSED


def test_responses_answer_pipelined_requests_in_order() -> None:
    reader = ResponseReader()
    for method in (b"GET", b"HEAD", b"GET"):
        reader.expect(method)
    reader.feed(
        resp(b"Content-Length: 1", body=b"a")
        + resp(b"Content-Length: 1")
        + resp(b"Content-Length: 1", body=b"c")
    )
    events = drive(reader)
    assert [e.body for e in events if isinstance(e, Response)] == ["length", "none", "length"]
    assert [e.data for e in events if isinstance(e, Data)] == [b"a", b"c"]


def test_response_without_a_request_is_rejected_with_502() -> None:
    reader = ResponseReader()
    reader.feed(resp(b"Content-Length: 0"))
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert (info.value.status, info.value.reason) == (502, "response without a request")


def test_second_response_to_a_single_request_is_rejected_with_502() -> None:
    error = response_error(resp(b"Content-Length: 0") + resp(b"Content-Length: 0"))
    assert (error.status, error.reason) == (502, "response without a request")


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", None, True),
        (b"HTTP/1.1", b"close", False),
        (b"HTTP/1.0", None, False),
        (b"HTTP/1.0", b"keep-alive", True),
    ],
)
def test_response_keep_alive_follows_version_and_connection(
    version: bytes, connection: bytes | None, keep_alive: bool
) -> None:
    fields = [b"Content-Length: 0"] + ([b"Connection: " + connection] if connection else [])
    head, _, _ = read_response(resp(*fields, line=version + b" 200 OK"))
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"HTTP/1.1 200", b""),
        (b"HTTP/1.1 404 ", b""),
        (b"HTTP/1.1 200 Very  OK\tok", b"Very  OK\tok"),
    ],
)
def test_status_line_reason_phrase_may_be_empty_or_contain_spaces(
    line: bytes, reason: bytes
) -> None:
    head, _, _ = read_response(resp(b"Content-Length: 0", line=line))
    assert head.reason == reason


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 600 Nope",
        b"HTTP/1.1 099 Nope",
        b"HTTP/2 200 OK",
        b"HTTP/1.1  200 OK",
        b"ICY 200 OK",
        b"<html>",
    ],
)
def test_malformed_status_lines_are_rejected_with_502(line: bytes) -> None:
    assert response_error(resp(b"Content-Length: 0", line=line)).status == 502


@pytest.mark.parametrize(
    "field",
    [
        b"X : y",
        b" folded",
        b"X: a\x00b",
        b"X: a\rb",
        b"Bad Name: v",
        b"Content-Length: 1, 2",
        b"Content-Length: -1",
        b"Content-Length: " + b"9" * 100,
    ],
)
def test_malformed_response_fields_are_rejected_with_502(field: bytes) -> None:
    assert response_error(resp(b"Server: x", field)).status == 502


def test_bare_lf_in_a_response_is_rejected_with_502() -> None:
    error = response_error(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n")
    assert (error.status, "bare LF" in error.reason) == (502, True)


def test_response_limits_are_reported_as_502() -> None:
    reader = ResponseReader(max_head=256)
    reader.expect(b"GET")
    reader.feed(resp(b"X: " + b"v" * 300, b"Content-Length: 0"))
    with pytest.raises(ProtocolError) as info:
        reader.next_event()
    assert info.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        resp(b"Content-Length: 10", body=b"abc"),
        resp(b"Transfer-Encoding: chunked", body=b"5\r\nab"),
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
)
def test_eof_in_the_middle_of_a_response_is_rejected_with_502(data: bytes) -> None:
    error = response_error(data, eof=True)
    assert (error.status, error.reason) == (502, "connection closed mid-message")


def test_eof_from_upstream_between_responses_is_a_clean_close() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed_eof()
    assert reader.next_event() is CLOSED


def test_malformed_chunk_in_a_response_is_rejected_with_502() -> None:
    error = response_error(resp(b"Transfer-Encoding: chunked", body=b"zz\r\n"))
    assert (error.status, error.reason) == (502, "invalid chunk size")


def test_response_content_length_body_streams_as_it_arrives() -> None:
    reader = ResponseReader()
    reader.expect(b"GET")
    reader.feed(resp(b"Content-Length: 6", body=b"ab"))
    assert isinstance(reader.next_event(), Response)
    assert reader.next_event() == Data(b"ab")
    assert reader.next_event() is NEED_DATA
    reader.feed(b"cdefHTTP/1.1")  # the start of an unexpected next response stays buffered
    assert reader.next_event() == Data(b"cdef")
    assert reader.next_event() == EndOfMessage([])
    assert reader.next_event() is PAUSED
    assert reader.take_buffered() == b"HTTP/1.1"
