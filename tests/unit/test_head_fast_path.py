"""
The request head fast path (L{policy.unchanged_head}): a head that needs no
field-by-field rewrite goes upstream as received, with our Via entry (and
X-Forwarded-For) added; whatever it decides, the bytes are those of the slow
path (L{policy.upstream_fields} + L{headers.serialize_request_head}).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_session import Rig

from tproxy_twist.http import framing, policy
from tproxy_twist.http import headers as H
from tproxy_twist.http.framing import (
    ProtocolError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)
from tproxy_twist.http.session import State

VIA = b"1.1 router (tproxy-twist)"
CLIENT = "198.51.100.2"


def parse(head: bytes) -> Request:
    reader = RequestReader(max_line=65536, max_head=65536)
    reader.feed(head)
    event = reader.next_event()
    assert isinstance(event, Request), event
    return event


def slow(request: Request, via: bytes | None, xff_mode: str) -> bytes:
    """The field-by-field path, as the session takes it for an origin-form request."""
    fields = policy.upstream_fields(
        request,
        host=None,
        upgrade=policy.wants_upgrade(request),
        via=via,
        xff_mode=xff_mode,
        client_ip=CLIENT,
    )
    if request.body == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
    return H.serialize_request_head(request.method, request.target, fields)


def fast(request: Request, via: bytes | None = VIA, xff_mode: str = "off") -> bytes | None:
    return policy.unchanged_head(request, via=via, xff_mode=xff_mode, client_ip=CLIENT)


def test_an_ordinary_browser_head_goes_as_received_with_via_added():
    head = (
        b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0 (X11)\r\n"
        b"Accept: text/html,*/*;q=0.8\r\nCookie: a=b; c=d\r\n"
    )
    request = parse(head + b"\r\n")
    assert fast(request) == head + b"Via: " + VIA + b"\r\n\r\n"
    assert fast(request) == slow(request, VIA, "off")


def test_x_forwarded_for_append_follows_via_and_via_off_adds_nothing():
    request = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert fast(request, xff_mode="append") == (
        b"GET / HTTP/1.1\r\nHost: a\r\nVia: " + VIA + b"\r\nX-Forwarded-For: " + CLIENT.encode()
        + b"\r\n\r\n"
    )  # fmt: skip
    assert fast(request, via=None) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert fast(request, via=None, xff_mode="strip") == slow(request, None, "strip")


def test_hop_by_hop_proxy_and_managed_fields_take_the_slow_path():
    for field in (
        b"Connection: close",
        b"connection: x-secret",
        b"Keep-Alive: timeout=5",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
        b"Trailer: Content-Digest",
        b"Upgrade: websocket",
        b"Proxy-Authorization: Basic eDp5",
        b"Proxy-Authenticate: Basic",
        b"Via: 1.1 other",
        b"X-Forwarded-For: 192.0.2.1",
        b"Transfer-Encoding: chunked",
    ):
        request = parse(b"POST / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n")
        assert fast(request) is None, field


def test_field_lines_that_would_not_serialize_back_take_the_slow_path():
    for line in (b"Accept:*/*", b"Accept:  */*", b"Accept:\t*/*", b"Accept: */* ", b"Accept: "):
        request = parse(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n")
        assert fast(request) is None, line
        request = parse(b"GET / HTTP/1.1\r\n" + line + b"\r\nHost: a\r\n\r\n")
        assert fast(request) is None, line


def test_http10_and_merged_content_length_take_the_slow_path():
    assert fast(parse(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")) is None
    merged = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
    assert merged.head is None and fast(merged) is None


def test_the_session_sends_the_fast_head_upstream_and_rewrites_the_rest():
    r = Rig("tproxy")
    r.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
    r.connect()
    assert r.sent() == (
        b"GET /x HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nVia: " + VIA + b"\r\n\r\n"
    )
    r = Rig("tproxy")
    r.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, x-a\r\nX-A: 1\r\n\r\n")
    r.connect()
    assert r.sent() == b"GET /x HTTP/1.1\r\nHost: example.com\r\nVia: " + VIA + b"\r\n\r\n"


# --- fast and slow agree on random heads ------------------------------------------------

_NAMES = st.sampled_from(
    [
        b"Accept", b"accept", b"User-Agent", b"Cookie", b"X-Custom", b"Content-Length",
        b"Content-Type", b"Expect", b"Via", b"VIA", b"X-Forwarded-For", b"Connection",
        b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade",
        b"Proxy-Authorization", b"Proxy-Authenticate", b"X-A", b"Te-X", b"Vias", b"Upgrader",
    ]
)  # fmt: skip
_VALUES = st.sampled_from(
    [
        b"*/*", b"text/html, */*", b"a=b; c=d", b"", b"1", b"0", b"close", b"keep-alive",
        b"x-a, close", b"Upgrade", b"websocket", b"1.1 other", b"192.0.2.1", b"100-continue",
        b"chunked", b"a:b:c", b"\xc3\xa9t\xc3\xa9", b"x\ty",
    ]
)  # fmt: skip
_SPACE = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])


@st.composite
def heads(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"DELETE"]))
    target = draw(st.sampled_from([b"/", b"/a/b?c=d", b"/%20x", b"*"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + target + b" " + version]
    fields = draw(st.lists(st.tuples(_NAMES, _SPACE, _VALUES, _SPACE), max_size=8))
    host = draw(st.integers(0, len(fields)))
    fields.insert(host, (b"Host", b" ", b"example.com", b""))
    for name, before, value, after in fields:
        lines.append(name + b":" + before + value + after)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads(),
    st.sampled_from([VIA, None]),
    st.sampled_from(["off", "append", "strip"]),
)
def test_fast_and_slow_paths_send_the_same_bytes(head, via, xff_mode):
    try:
        request = parse(head)
    except (ProtocolError, AssertionError):
        return  # a head the framing refuses never gets this far
    if request.target == b"*" and request.method != b"OPTIONS":
        return
    fast_head = fast(request, via=via, xff_mode=xff_mode)
    if fast_head is not None:
        assert fast_head == slow(request, via, xff_mode)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"Accept", b"User-Agent", b"Cookie", b"X-Custom", b"Referer"]),
            st.sampled_from([b"*/*", b"a=b; c=d", b"x", b"http://a.example/b:c"]),
        ),
        max_size=6,
    )
)
def test_ordinary_heads_do_take_the_fast_path(fields):
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    request = parse(head + b"\r\n")
    assert fast(request) == slow(request, VIA, "off")
    assert fast(request) is not None


# --- responses ------------------------------------------------------------------------


def parse_response(head: bytes, method: bytes = b"GET") -> Response:
    reader = ResponseReader(max_line=65536, max_head=65536)
    reader.expect(method)
    reader.feed(head)
    event = reader.next_event()
    assert isinstance(event, Response), event
    return event


def slow_response(response: Response, via: bytes | None) -> bytes:
    """What the session makes of a final HTTP/1.1 response it adds nothing to but Via."""
    fields = H.strip_hop_by_hop(response.headers)
    if via is not None:
        fields = H.add_via(fields, via)
    return H.serialize_response_head(response.status, response.reason, fields)


def test_an_ordinary_response_head_goes_as_received_with_via_added():
    head = b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nETag: "x"\r\n'
    response = parse_response(head + b"\r\n")
    assert policy.unchanged_response_head(response, VIA) == head + b"Via: " + VIA + b"\r\n\r\n"
    assert policy.unchanged_response_head(response, None) == head + b"\r\n"


def test_response_heads_that_are_rewritten_take_the_slow_path():
    for head in (
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n",  # serialized as "HTTP/1.1 200 "
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.1 other\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nProxy-Authenticate: Basic\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length:0\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n",
    ):
        assert policy.unchanged_response_head(parse_response(head + b"\r\n"), VIA) is None, head


def test_the_session_relays_the_fast_response_head_and_rewrites_the_rest():
    r = Rig("tproxy")
    r.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok")
    assert r.received() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nVia: " + VIA + b"\r\n\r\nok"
    )
    r = Rig("tproxy")
    r.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n")
    assert r.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: " + VIA + b"\r\n\r\n"


@st.composite
def response_heads(draw) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([b"200", b"204", b"304", b"404", b"500"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not Found", b" a  b"]))
    lines = [version + b" " + status + reason]
    fields = draw(st.lists(st.tuples(_NAMES, _SPACE, _VALUES, _SPACE), max_size=8))
    for name, before, value, after in fields:
        lines.append(name + b":" + before + value + after)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(response_heads(), st.sampled_from([VIA, None]), st.sampled_from([b"GET", b"HEAD"]))
def test_fast_and_slow_paths_send_the_same_response_bytes(head, via, method):
    try:
        response = parse_response(head, method)
    except (ProtocolError, AssertionError):
        return  # refused by the framing: a 502, never relayed
    fast_head = policy.unchanged_response_head(response, via)
    if fast_head is not None:
        assert fast_head == slow_response(response, via)


def test_host_agreement_is_remembered_and_invalid_authorities_still_raise():
    destination = ("203.0.113.2", 80)
    for _ in range(2):
        assert policy.host_agrees(b"203.0.113.2", destination)
        assert not policy.host_agrees(b"203.0.113.9", destination)
        assert not policy.host_agrees(b"example.com:8080", destination)
        assert policy.host_agrees(b"a" * 300 + b".example", destination)  # not remembered
        with pytest.raises(ProtocolError):
            policy.host_agrees(b"[2001:db8::1", destination)


@given(st.binary(max_size=30) | st.text("ab1.-_~%:[]@!$&'()*+,;= 9", max_size=30).map(str.encode))
def test_the_plain_host_shortcut_accepts_only_what_the_full_check_accepts(value):
    from tproxy_twist.http import framing

    if framing._PLAIN_HOST.fullmatch(value) is None:
        return
    match = framing._HOST.fullmatch(value)
    assert match is not None
    host, port = match.groups()
    assert port is None and host[:1] != b"[" and framing._valid_host(value)


# --- what the reader finds in one pass equals what the field list says -----------------

# The definitions the policy used before the reader found them in its one pass:
# a rewritten field (hop-by-hop, Via, X-Forwarded-For) at a line start, and
# field lines that serialize back byte for byte.
_REWRITTEN = re.compile(
    rb"\r\n(?:"
    + b"|".join(re.escape(name) for name in sorted(H.HOP_BY_HOP | {b"via", b"x-forwarded-for"}))
    + rb"):",
    re.IGNORECASE,
)
_UNCANONICAL_COLON = re.compile(rb"\r\n[^:\r]*:(?! [^ \r])")


def _plain_by_definition(block: bytes) -> bool:
    return (
        _REWRITTEN.search(block) is None
        and b"\t" not in block
        and b" \r\n" not in block
        and block[-1:] != b" "
        and _UNCANONICAL_COLON.search(block) is None
    )


def test_the_managed_fields_are_the_hop_by_hop_ones_via_and_x_forwarded_for():
    assert framing.MANAGED_FIELDS == H.HOP_BY_HOP | {b"via", b"x-forwarded-for"}


def _lookups_agree(message) -> None:
    """get/get_all on the block (no field list yet) say what the field list says."""
    names = {n.lower() for n, _ in framing._field_list(message._block)}
    for name in names | {b"host", b"via", b"content-type", b"absent", b"te"}:
        lazy_one, lazy_all = message.get(name), message.get_all(name)
        fields = [v for n, v in framing._field_list(message._block) if n.lower() == name]
        assert lazy_one == (fields[0] if fields else None), name
        assert lazy_all == fields, name


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_plain_and_the_lookups_of_a_request_agree_with_their_definitions(head):
    try:
        request = parse(head)
    except (ProtocolError, AssertionError):
        return
    assert request.plain == _plain_by_definition(head[: head.index(b"\r\n\r\n")])
    if request.head is not None:
        _lookups_agree(request)
        assert request.headers == framing._field_list(request.head)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(response_heads())
def test_plain_and_the_lookups_of_a_response_agree_with_their_definitions(head):
    try:
        response = parse_response(head)
    except (ProtocolError, AssertionError):
        return
    if response.interim:
        return
    assert response.plain == _plain_by_definition(head[: head.index(b"\r\n\r\n")])
    if response.head is not None:
        _lookups_agree(response)


def test_a_bodiless_request_can_be_ended_without_its_end_of_message_event():
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(reader.next_event(), Request)
    assert reader.take_end()
    assert reader.next_event() is framing.PAUSED
    reader.start_next()
    assert reader.next_event().target == b"/2"
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(reader.next_event(), Request)
    assert not reader.take_end()  # a body follows: nothing changes
    assert reader.next_event() == framing.Data(b"ok")


# --- the trimmed heads: plain but for Connection, Keep-Alive, Proxy-Connection ---------

_TRIM_NAMES = st.sampled_from(
    [
        b"Accept", b"Cookie", b"Connection", b"connection", b"Keep-Alive", b"Proxy-Connection",
        b"Accept", b"Cookie", b"Connection", b"CONNECTION", b"Keep-Alive", b"Proxy-Connection",
        b"Close", b"X-A", b"Content-Length", b"Via", b"TE", b"Upgrade", b"Connections",
    ]
)  # fmt: skip
_TRIM_VALUES = st.sampled_from(
    [b"keep-alive", b"close", b"Keep-Alive", b"keep-alive, close", b"x-a", b"timeout=5",
     b"keep-alive", b"close", b"upgrade", b"*/*", b"0", b"a b", b""]
)  # fmt: skip


@st.composite
def trim_heads(draw, start: bytes) -> bytes:
    lines = [start]
    # Mostly plain lines ("name: value"), so that many heads are trimmed.
    before = st.sampled_from([b" ", b" ", b" ", b" ", b"", b"  ", b"\t"])
    after = st.sampled_from([b"", b"", b"", b"", b" "])
    fields = draw(st.lists(st.tuples(_TRIM_NAMES, before, _TRIM_VALUES, after), max_size=5))
    if start.startswith(b"GET"):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b" ", b"example.com", b""))
    for name, before, value, after in fields:
        lines.append(name + b":" + before + value + after)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    trim_heads(b"GET /a HTTP/1.1"),
    st.sampled_from([VIA, None]),
    st.sampled_from(["off", "append", "strip"]),
)
def test_trimmed_and_slow_paths_send_the_same_request_bytes(head, via, xff_mode):
    try:
        request = parse(head)
    except (ProtocolError, AssertionError):
        return
    trimmed = policy.trimmed_head(request, via=via, xff_mode=xff_mode, client_ip=CLIENT)
    if trimmed is not None:
        assert trimmed == slow(request, via, xff_mode)
        assert not request.plain


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(trim_heads(b"HTTP/1.1 200 OK"), st.sampled_from([VIA, None]))
def test_trimmed_and_slow_paths_send_the_same_response_bytes(head, via):
    try:
        response = parse_response(head)
    except (ProtocolError, AssertionError):
        return
    trimmed = policy.trimmed_response_head(response, via)
    if trimmed is not None:
        assert trimmed == slow_response(response, via)
        assert not response.plain


def test_keep_alive_heads_of_browsers_and_nginx_are_trimmed():
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0\r\nConnection: keep-alive\r\n"
        b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    trimmed = policy.trimmed_head(request, via=VIA, xff_mode="off", client_ip=CLIENT)
    assert trimmed == (
        b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\nVia: " + VIA
        + b"\r\n\r\n"
    )  # fmt: skip
    assert trimmed == slow(request, VIA, "off")
    response = parse_response(
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\nConnection: keep-alive\r\n"
        b'Keep-Alive: timeout=5\r\nETag: "x"\r\n\r\n'
    )
    trimmed = policy.trimmed_response_head(response, VIA)
    assert trimmed == (
        b'HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\nETag: "x"\r\nVia: ' + VIA
        + b"\r\n\r\n"
    )  # fmt: skip
    assert trimmed == slow_response(response, VIA)


def test_heads_whose_connection_field_does_more_than_keep_alive_are_not_trimmed():
    for fields in (
        b"Connection: keep-alive, x-a\r\nX-A: 1\r\n",  # nominates a field
        b"Connection: close\r\nClose: 1\r\n",  # "close" nominates a field named Close
        b"Connection: keep-alive\r\nVia: 1.1 other\r\n",  # Via is merged, not dropped
        b"Connection: keep-alive\r\nTE: trailers\r\n",
        b"Connection: keep-alive\r\nAccept:*/*\r\n",  # not serialized back as received
    ):
        request = parse(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        assert policy.trimmed_head(request, via=VIA, xff_mode="off", client_ip=CLIENT) is None
        response = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n")
        assert policy.trimmed_response_head(response, VIA) is None


def test_the_session_relays_keep_alive_heads_without_their_connection_fields():
    r = Rig("tproxy")
    r.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n")
    r.connect()
    assert r.sent() == b"GET /x HTTP/1.1\r\nHost: example.com\r\nVia: " + VIA + b"\r\n\r\n"
    r.answer(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    assert r.received() == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: " + VIA + b"\r\n\r\nok")


# --- round four: one call for the fast heads, the whole body with its head ------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads() | trim_heads(b"GET /a HTTP/1.1"),
    st.sampled_from([VIA, None]),
    st.sampled_from(["off", "append", "strip"]),
)
def test_forwarded_head_is_the_unchanged_or_else_the_trimmed_head(head, via, xff_mode):
    try:
        request = parse(head)
    except (ProtocolError, AssertionError):
        return
    kw = {"via": via, "xff_mode": xff_mode, "client_ip": CLIENT}
    expected = policy.unchanged_head(request, **kw) or policy.trimmed_head(request, **kw)
    assert policy.forwarded_head(request, via, xff_mode, CLIENT) == expected


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    response_heads() | trim_heads(b"HTTP/1.1 200 OK"),
    st.sampled_from([VIA, None]),
    st.sampled_from([b"GET", b"HEAD"]),
)
def test_forwarded_response_head_is_the_unchanged_or_else_the_trimmed_head(head, via, method):
    try:
        response = parse_response(head, method)
    except (ProtocolError, AssertionError):
        return
    expected = policy.unchanged_response_head(response, via) or policy.trimmed_response_head(
        response, via
    )
    assert policy.forwarded_response_head(response, via) == expected


def _events_after_head(reader: ResponseReader) -> tuple[bytes, bool]:
    """The body bytes next_event() returns now, and whether EndOfMessage came."""
    body = b""
    while True:
        event = reader.next_event()
        if isinstance(event, framing.Data):
            body += event.data
        else:
            return body, isinstance(event, framing.EndOfMessage)


@settings(max_examples=300)
@given(
    st.integers(1, 40),
    st.integers(0, 60),
    st.binary(max_size=20),
)
def test_take_body_is_the_data_and_end_events_when_the_whole_body_is_buffered(
    length, received, after
):
    body = (b"abcdefghijklmnopqrstuvwxyz" * 2)[:length]
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + body + after
    wire = wire[: wire.index(b"\r\n\r\n") + 4 + received]
    readers = []
    for _ in range(2):
        reader = ResponseReader()
        reader.expect(b"GET")
        reader.feed(wire)
        assert isinstance(reader.next_event(), Response)
        readers.append(reader)
    taken, evented = readers
    got = taken.take_body()
    events, ended = _events_after_head(evented)
    if got is None:
        assert not ended  # the body is not all here: nothing was taken
        assert taken.buffered == min(received, length)
        assert _events_after_head(taken) == (events, False)
    else:
        assert ended and got == events == body
        assert taken.next_event() is framing.PAUSED
        assert taken.start_next() == evented.start_next() == bool(after[: received - length])
        assert taken.buffered == evented.buffered


def test_take_body_leaves_other_bodies_to_the_events():
    for wire, method in [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"GET"),
        (b"HTTP/1.1 200 OK\r\n\r\nok", b"GET"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"HEAD"),
    ]:
        reader = ResponseReader()
        reader.expect(method)
        reader.feed(wire)
        assert isinstance(reader.next_event(), Response)
        assert reader.take_body() is None


def test_start_next_says_whether_the_next_message_began_to_arrive():
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    reader.next_event()
    assert reader.take_end()
    assert reader.start_next() is False
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nG")
    reader.next_event()
    assert reader.take_end()
    assert reader.start_next() is True


def test_the_session_sends_a_whole_response_in_one_write_and_counts_its_bytes():
    r = Rig()
    calls = []
    write, write_sequence = r.io.write, r.io.write_sequence
    r.io.write = lambda data: (calls.append([data]), write(data))
    r.io.write_sequence = lambda parts: (calls.append(list(parts)), write_sequence(parts))
    r.send(b"GET / HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: " + VIA + b"\r\n\r\n"
    assert calls == [[head, b"ok"]]
    assert r.received() == head + b"ok"
    assert r.io.records[-1].bytes_out == len(head) + 2
    assert r.state is State.IDLE
    # A body that comes after its head: the head now, the body as it arrives.
    r.send(b"GET / HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
    assert r.state is State.RESPONDING
    r.answer(b"k")
    assert calls[1:] == [[head], [b"o"], [b"k"]]
    assert r.io.records[-1].bytes_out == len(head) + 2
    assert r.state is State.IDLE


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(trim_heads(b"GET /a HTTP/1.1") | trim_heads(b"HTTP/1.1 200 OK"))
def test_without_connection_fields_drops_exactly_the_connection_lines(head):
    try:
        message = parse(head) if head.startswith(b"GET") else parse_response(head)
    except (ProtocolError, AssertionError):
        return
    block = head[: head.index(b"\r\n\r\n")]
    kept = [block.split(b"\r\n")[0]] + [
        line
        for line in block.split(b"\r\n")[1:]
        if line.split(b":")[0].lower() not in (b"connection", b"keep-alive", b"proxy-connection")
    ]
    assert message.without_connection_fields() == b"\r\n".join(kept)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    response_heads() | trim_heads(b"HTTP/1.1 200 OK"),
    st.sampled_from([VIA, None]),
)
def test_a_closing_forwarded_response_head_is_what_the_rewrite_makes_with_connection_close(
    head, via
):
    # The last response on a connection whose client asked to close: the fast head
    # with Connection: close is byte for byte the field-by-field rewrite's.
    try:
        response = parse_response(head)
    except (ProtocolError, AssertionError):
        return
    closing = policy.forwarded_response_head(response, via, closing=True)
    if closing is None:
        assert policy.forwarded_response_head(response, via) is None
        return
    fields = H.strip_hop_by_hop(response.headers) + [(b"Connection", b"close")]
    if via is not None:
        fields = H.add_via(fields, via)
    assert closing == H.serialize_response_head(response.status, response.reason, fields)
