"""
The sans-IO session on its own: transitions of every state, the HTTP
semantics it owns, and a hypothesis.stateful machine driving random
interleavings of client, upstream and timer events.
"""

from __future__ import annotations

import errno
import os
import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from twisted.internet import error as neterror
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tproxy_twist import config as C
from tproxy_twist.http import policy
from tproxy_twist.http.session import (
    CONNECTING_READS,
    PIPELINE,
    Deadline,
    Link,
    Session,
    SessionConfig,
    State,
)
from tproxy_twist.logthrottle import LogThrottle

CLIENT_IP = "198.51.100.2"
ORIGIN = ("203.0.113.2", 80)
ROUTER = frozenset({"198.51.100.1", "203.0.113.1"})

GET = b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
FORWARD_ALLOW = 'allow = ["198.51.100.0/24"]\n'


class FakeIO:
    """Records what a session asks; fails a test on a write after close."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.write_shut = False
        self.paused: set[int] = set()
        self.connects: list[tuple[Link, tuple[str, int], str | None]] = []
        self.attached: list[Link] = []
        self.sent: dict[int, bytearray] = {}
        self.upstream_closed: set[int] = set()
        self.upstream_aborted: set[int] = set()
        self.upstream_write_shut: set[int] = set()
        self.records: list = []
        self.large: list = []

    # client side
    def _check_open(self) -> None:
        assert not (self.closing or self.aborted or self.write_shut), "write after close"

    def write(self, data: bytes) -> None:
        self._check_open()
        self.out += data

    def write_sequence(self, parts: list[bytes]) -> None:
        self._check_open()
        self.out += b"".join(parts)

    def close(self) -> None:
        assert not self.aborted
        self.closing = True

    def abort(self) -> None:
        self.aborted = True

    def shutdown_write(self) -> None:
        self._check_open()
        self.write_shut = True

    def pause(self, reason: int) -> None:
        self.paused.add(reason)

    def resume(self, reason: int) -> None:
        self.paused.discard(reason)

    # upstream side
    def connect(self, link, destination, source_ip) -> None:
        self.connects.append((link, destination, source_ip))

    def attach(self, link) -> None:
        self.attached.append(link)
        self.sent[id(link)] = bytearray()

    def _check_upstream(self, link) -> None:
        key = id(link)
        assert key in self.sent, "write to an upstream that never connected"
        assert key not in self.upstream_closed and key not in self.upstream_aborted, (
            "write to a closed upstream"
        )
        assert key not in self.upstream_write_shut, "write after shutting the upstream down"

    def upstream_write(self, link, data: bytes) -> None:
        self._check_upstream(link)
        self.sent[id(link)] += data

    def upstream_write_sequence(self, link, parts) -> None:
        self._check_upstream(link)
        self.sent[id(link)] += b"".join(parts)

    def upstream_close(self, link) -> None:
        self.upstream_closed.add(id(link))

    def upstream_abort(self, link) -> None:
        self.upstream_aborted.add(id(link))

    def upstream_shutdown_write(self, link) -> None:
        self.upstream_write_shut.add(id(link))

    def large_reads(self, link, large: bool) -> None:
        self.large.append((link, large))

    def finished(self, record) -> None:
        assert record not in self.records, "a record handed over twice"
        self.records.append(record)

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Rig:
    """A session on a port of the given mode, with a fake IO and clock."""

    def __init__(
        self,
        mode: str = "tproxy",
        extra: str = "",
        *,
        top: str = "",
        destination: tuple[str, int] | None = ORIGIN,
    ) -> None:
        listen = "0.0.0.0:3128" if mode == "forward" else "[::]:3129"
        text = f'{top}[[port]]\nname = "p"\nlisten = "{listen}"\nmode = "{mode}"\n{extra}'
        cfg = C.loads(text)
        self.port = cfg.ports[0]
        self.clock = Clock()
        self.clock.advance(1000)
        self.timeouts = cfg.timeouts
        self.config = SessionConfig(
            self.port, cfg.timeouts, cfg.limits, "router", LogThrottle(self.clock), ROUTER
        )
        if mode == "forward":
            destination = None
        self.io = FakeIO()
        refusal = policy.admission(self.port, CLIENT_IP, destination, ROUTER)
        self.session = Session(self.config, self.io, self.clock, CLIENT_IP, destination, refusal)

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def deadline(self) -> Deadline | None:
        return self.session.deadline_kind

    def send(self, data: bytes) -> None:
        self.session.client_data(data)

    def link(self) -> Link:
        return self.io.connects[-1][0]

    def connect(self) -> Link:
        link = self.link()
        self.session.upstream_connected(link)
        return link

    def answer(self, data: bytes, link: Link | None = None) -> None:
        self.session.upstream_data(link or self.link(), data)

    def sent(self, link: Link | None = None) -> bytes:
        return bytes(self.io.sent[id(link or self.link())])

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.session.tick(self.clock.seconds())

    def received(self) -> bytes:
        return self.io.take()


def head_fields(data: bytes) -> tuple[bytes, list[bytes]]:
    start, *fields = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return start, fields


# --- IDLE ---------------------------------------------------------------------------


def test_idle_waits_for_the_next_request_under_the_client_idle_deadline():
    r = Rig()
    assert (r.state, r.deadline) == (State.IDLE, Deadline.CLIENT_IDLE)


def test_idle_part_of_a_head_moves_to_head_under_the_request_header_deadline():
    r = Rig()
    r.send(b"GET / HT")
    assert (r.state, r.deadline) == (State.HEAD, Deadline.REQUEST_HEADER)


def test_idle_a_whole_head_starts_connecting_to_the_original_destination():
    r = Rig()
    r.send(GET)
    assert r.state is State.CONNECTING and r.deadline is not None
    assert r.io.connects[-1][1:] == (ORIGIN, CLIENT_IP)


def test_idle_client_eof_closes_quietly():
    r = Rig()
    r.session.client_eof()
    assert r.state is State.CLOSING and r.io.closing and r.received() == b""


def test_idle_client_idle_expiry_closes_without_an_answer():
    r = Rig()
    r.advance(r.timeouts.client_idle + 0.1)
    assert r.state is State.CLOSING and r.received() == b"" and r.io.records == []


# --- HEAD ---------------------------------------------------------------------------


def test_head_the_rest_of_the_head_starts_the_exchange():
    r = Rig()
    r.send(GET[:10])
    r.send(GET[10:])
    assert r.state is State.CONNECTING


def test_head_request_header_expiry_answers_408_and_lingers():
    r = Rig()
    r.send(b"GET / HTTP/1.1\r\n")
    r.advance(r.timeouts.request_header + 0.1)
    assert r.received().startswith(b"HTTP/1.1 408 ")
    assert (r.state, r.deadline) == (State.LINGER, Deadline.LINGER)
    assert r.io.write_shut
    [record] = r.io.records
    assert (record.status, record.rejected) == (408, "timeout")


def test_head_client_eof_mid_head_is_answered_400_then_closed():
    r = Rig()
    r.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    r.session.client_eof()
    assert r.received().startswith(b"HTTP/1.1 400 ")
    assert r.state is State.CLOSING


# --- CONNECTING ---------------------------------------------------------------------


def test_connecting_success_sends_the_head_and_awaits_the_response():
    r = Rig()
    r.send(GET)
    r.connect()
    assert r.sent().startswith(b"GET /a HTTP/1.1\r\n")
    assert (r.state, r.deadline) == (State.AWAITING, Deadline.RESPONSE)


def test_connecting_with_a_body_to_come_goes_on_sending():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    r.connect()
    assert r.sent().endswith(b"\r\n\r\nab")
    assert (r.state, r.deadline) == (State.SENDING, Deadline.IDLE)


def test_connecting_failure_is_answered_and_recorded():
    r = Rig()
    r.send(GET)
    r.session.upstream_failed(r.link(), neterror.ConnectionRefusedError())
    assert r.received().startswith(b"HTTP/1.1 502 ")
    assert r.state is State.LINGER
    [record] = r.io.records
    assert (record.status, record.upstream_error, record.result) == (502, "refused", "NONE")


def test_connecting_buffers_early_bytes_and_pauses_beyond_a_socket_read():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n")
    r.send(b"x" * 70000)
    assert CONNECTING_READS in r.io.paused
    r.connect()
    assert CONNECTING_READS not in r.io.paused
    assert r.sent().endswith(b"x" * 70000)


def test_connecting_a_late_connection_after_an_answer_is_aborted():
    r = Rig()
    r.send(GET)
    link = r.link()
    r.advance(r.timeouts.idle + 1)  # answered 504 meanwhile
    link.handle = object()
    r.session.upstream_connected(link)
    assert id(link) in r.io.upstream_aborted


# --- SENDING ------------------------------------------------------------------------


def test_sending_the_end_of_the_body_arms_the_response_deadline():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    r.connect()
    r.send(b"cd")
    assert (r.state, r.deadline) == (State.AWAITING, Deadline.RESPONSE)


def test_sending_an_early_response_closes_the_client_after_it():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    r.connect()
    r.answer(b"HTTP/1.1 413 Too big\r\nContent-Length: 0\r\n\r\n")
    data = r.received()
    assert data.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in data
    assert r.state is State.CLOSING


def test_sending_idle_expiry_answers_504():
    r = Rig(top="[timeouts]\nidle = 5\n")
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    r.connect()
    r.advance(6)
    assert r.received().startswith(b"HTTP/1.1 504 ")


# --- AWAITING -----------------------------------------------------------------------


def test_awaiting_a_complete_response_returns_to_idle_and_records_once():
    r = Rig()
    r.send(GET)
    r.connect()
    r.answer(OK)
    assert r.received().endswith(b"hello")
    assert (r.state, r.deadline) == (State.IDLE, Deadline.CLIENT_IDLE)
    [record] = r.io.records
    assert (record.status, record.result, record.incomplete) == (200, "TCP_MISS", None)


def test_awaiting_response_expiry_answers_504_naming_the_upstream():
    r = Rig()
    r.send(GET)
    r.connect()
    r.advance(r.timeouts.response + 0.1)
    data = r.received()
    assert data.startswith(b"HTTP/1.1 504 ") and b"203.0.113.2:80 did not answer" in data
    assert id(r.link()) in r.io.upstream_closed
    assert r.io.records[-1].upstream_error == "timeout"


def test_awaiting_upstream_closing_without_answering_is_502():
    r = Rig()
    r.send(GET)
    r.connect()
    r.session.upstream_lost(r.link())
    assert r.received().startswith(b"HTTP/1.1 502 ")
    assert r.io.records[-1].upstream_error == "reset"


def test_a_request_replayed_on_a_forward_port_is_under_the_response_timeout():
    """The origin closes a reused idle connection as the next GET goes out:
    the GET is resent on a fresh connection and its response is waited for
    no longer than the response timeout (it used to wait forever)."""
    r = Rig("forward", FORWARD_ALLOW)
    request = b"GET http://203.0.113.2/x HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n"
    r.send(request)
    first = r.connect()
    r.answer(OK)
    r.received()
    r.send(request)
    assert (r.state, r.deadline) == (State.AWAITING, Deadline.RESPONSE)
    r.session.upstream_lost(first)
    assert len(r.io.connects) == 2 and r.state is State.CONNECTING
    assert r.deadline is not None
    second = r.connect()
    assert r.sent(second).startswith(b"GET /x HTTP/1.1")
    assert (r.state, r.deadline) == (State.AWAITING, Deadline.RESPONSE)
    r.advance(r.timeouts.response + 0.1)
    assert r.received().startswith(b"HTTP/1.1 504 ")


def test_a_response_deadline_while_reconnecting_on_a_forward_port_does_not_raise():
    r = Rig("forward", FORWARD_ALLOW)
    request = b"GET http://203.0.113.2/x HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n"
    r.send(request)
    first = r.connect()
    r.answer(OK)
    r.send(request)
    r.session.upstream_lost(first)  # replay: connecting again, no upstream yet
    r.advance(r.timeouts.response + 0.1)
    data = r.received()
    assert b"HTTP/1.1 504 " in data and b"203.0.113.2:80" in data


# --- RESPONDING ---------------------------------------------------------------------


def test_responding_body_pieces_are_relayed_under_the_idle_deadline():
    r = Rig()
    r.send(GET)
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    assert (r.state, r.deadline) == (State.RESPONDING, Deadline.IDLE)
    r.answer(b"56789")
    assert r.state is State.IDLE


def test_responding_cut_off_by_the_origin_aborts_and_is_recorded_aborted():
    r = Rig()
    r.send(GET)
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    r.session.upstream_lost(r.link())
    assert r.io.aborted and r.state is State.CLOSED
    [record] = r.io.records
    assert (record.result, record.incomplete, record.upstream_error) == (
        "TCP_MISS_ABORTED",
        "upstream",
        "reset",
    )


def test_responding_client_leaving_is_recorded_aborted():
    r = Rig()
    r.send(GET)
    link = r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    r.session.client_lost()
    [record] = r.io.records
    assert (record.result, record.incomplete) == ("TCP_MISS_ABORTED", "client")
    assert id(link) in r.io.upstream_aborted


def test_responding_idle_expiry_aborts_a_started_response():
    r = Rig(top="[timeouts]\nidle = 5\n")
    r.send(GET)
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    r.received()
    r.advance(6)
    assert r.io.aborted and r.received() == b""
    assert r.io.records[-1].incomplete == "timeout"


# --- SPLICING: the adapter relays a Content-Length body itself ----------------------

SPLICE_MIN = "[limits]\nsplice_body_min = 1000\n"
BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"


def splicing_rig(top: str = "") -> Rig:
    """A session RESPONDING a 5,000-byte body of which 100 bytes came with the head."""
    r = Rig(top=SPLICE_MIN + top)
    r.send(GET)
    r.connect()
    r.answer(BIG_HEAD + b"x" * 100)
    return r


def test_responding_offers_the_rest_of_a_long_body_once_what_was_read_went_out():
    r = splicing_rig()
    assert r.received().endswith(b"\r\n\r\n" + b"x" * 100)
    assert r.session.body_to_splice() == 4900
    assert r.state is State.RESPONDING  # asking changes nothing
    r.session.splicing_body()
    assert (r.state, r.deadline) == (State.SPLICING, Deadline.IDLE)


@pytest.mark.parametrize(
    "top, request_, response",
    [
        ("", GET, b"HTTP/1.1 200 OK\r\nContent-Length: 1099\r\n\r\n" + b"x" * 100),
        ("", GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n"),
        ("", GET, b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
        ("", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc", BIG_HEAD),
        ("[limits]\nsplice_body_min = 0\n", GET, BIG_HEAD),
    ],
    ids=["below-the-minimum", "chunked", "until-close", "request-still-arriving", "off"],
)
def test_no_body_is_offered_for_splicing_unless_its_length_and_the_request_allow(
    top, request_, response
):
    r = Rig(top=top or SPLICE_MIN)
    r.send(request_)
    r.connect()
    r.answer(response)
    assert r.state is State.RESPONDING
    assert r.session.body_to_splice() == 0
    with pytest.raises(RuntimeError):
        r.session.splicing_body()


def test_splicing_a_whole_body_ends_the_response_and_keeps_the_connection():
    r = splicing_rig()
    link = r.link()
    written = r.received()
    r.session.splicing_body()
    r.session.relayed(0, 4000)
    r.session.relayed(0, 900)
    r.session.body_spliced()
    assert (r.state, r.deadline) == (State.IDLE, Deadline.CLIENT_IDLE)
    assert r.received() == b""  # the session wrote nothing of the body itself
    [record] = r.io.records
    assert record.result == "TCP_MISS" and record.incomplete is None
    assert record.bytes_out == len(written) + 4900
    # The same upstream serves the next request.
    r.send(GET)
    assert r.state is State.AWAITING and r.link() is link and len(r.io.connects) == 1


def test_a_pipelined_request_waits_for_the_spliced_body_then_is_answered():
    r = Rig(top=SPLICE_MIN)
    r.send(GET + b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n")
    link = r.connect()
    r.answer(BIG_HEAD)
    r.session.splicing_body()
    assert r.sent(link).count(b"GET ") == 1
    r.session.body_spliced()
    assert r.sent(link).count(b"GET /next") == 1 and r.state is State.AWAITING


def test_splicing_broken_by_the_origin_is_an_upstream_error_and_aborts_both():
    r = splicing_rig()
    link = r.link()
    r.session.splicing_body()
    r.session.relayed(0, 2000)
    r.session.body_splice_failed(upstream=True)
    assert r.io.aborted and r.state is State.CLOSED
    assert id(link) in r.io.upstream_closed | r.io.upstream_aborted
    [record] = r.io.records
    assert (record.result, record.incomplete, record.upstream_error) == (
        "TCP_MISS_ABORTED",
        "upstream",
        "reset",
    )
    r.session.client_lost()
    assert len(r.io.records) == 1


def test_splicing_broken_by_the_client_is_recorded_as_the_clients():
    r = splicing_rig()
    r.session.splicing_body()
    r.session.body_splice_failed(upstream=False)
    assert r.io.aborted
    [record] = r.io.records
    assert (record.incomplete, record.upstream_error) == ("client", None)


def test_splicing_bytes_moving_keep_the_idle_deadline_away_and_silence_times_out():
    r = splicing_rig("[timeouts]\nidle = 5\n")
    r.session.splicing_body()
    for _ in range(10):
        r.clock.advance(1)
        r.session.relayed(0, 100)
        r.session.tick(r.clock.seconds())
    assert r.state is State.SPLICING and not r.io.aborted
    r.advance(6)
    assert r.io.aborted and r.state is State.CLOSED
    [record] = r.io.records
    assert record.incomplete == "timeout"


def test_splicing_client_gone_and_drain_timeout_record_the_exchange_once():
    r = splicing_rig()
    link = r.link()
    r.session.splicing_body()
    r.session.abort("drain")
    r.session.client_lost()
    [record] = r.io.records
    assert record.incomplete == "drain" and id(link) in r.io.upstream_aborted


def test_splicing_under_drain_finishes_the_body_then_closes_when_idle():
    r = splicing_rig()
    r.session.splicing_body()
    r.session.drain(1.0)
    assert r.state is State.SPLICING and not r.io.closing
    r.session.body_spliced()
    assert r.state is State.IDLE
    r.clock.advance(2)
    r.session.drain(1.0)
    assert r.io.closing


def test_a_body_spliced_or_broken_twice_or_unasked_changes_nothing():
    r = splicing_rig()
    r.session.body_spliced()  # not splicing: ignored
    r.session.body_splice_failed(upstream=True)
    assert r.state is State.RESPONDING and not r.io.records


def test_relayed_bytes_keep_a_tunnel_alive_and_count_for_its_record():
    r = Rig("forward", FORWARD_ALLOW, top="[timeouts]\nidle = 5\n")
    connect = b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n"
    r.send(connect)
    link = r.connect()
    established = len(r.received())
    for _ in range(10):
        r.clock.advance(1)
        r.session.relayed(10, 1000)
        r.session.tick(r.clock.seconds())
    assert r.state is State.TUNNEL
    r.session.upstream_lost(link)
    [record] = r.io.records
    assert (record.bytes_in, record.bytes_out) == (len(connect) + 100, established + 10_000)


# --- TUNNEL -------------------------------------------------------------------------


def test_tunnel_connect_carries_bytes_both_ways_and_ends_with_the_upstream():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
    link = r.connect()
    assert r.received() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert (r.state, r.deadline) == (State.TUNNEL, Deadline.IDLE)
    r.send(b"client bytes")
    r.answer(b"HTTP/1.1 200 not parsed")
    assert r.sent(link) == b"client bytes"
    assert r.received() == b"HTTP/1.1 200 not parsed"
    r.session.upstream_lost(link)
    assert r.state is State.CLOSING
    [record] = r.io.records
    assert (record.result, record.status) == ("TCP_TUNNEL", 200)


def test_tunnel_client_eof_shuts_the_upstream_side_down():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
    link = r.connect()
    r.session.client_eof()
    assert id(link) in r.io.upstream_write_shut
    r.answer(b"still flowing")
    assert r.received().endswith(b"still flowing")


# --- LINGER, CLOSING, CLOSED --------------------------------------------------------


def test_linger_ends_when_the_client_closes_its_side():
    r = Rig()
    r.send(b"BAD\r\n\r\n")
    assert r.state is State.LINGER
    r.send(b"more input is dropped")
    r.session.client_eof()
    assert r.state is State.CLOSING and r.io.closing


def test_linger_expiry_aborts():
    r = Rig()
    r.send(b"BAD\r\n\r\n")
    r.advance(3)
    assert r.state is State.CLOSED and r.io.aborted


def test_closing_a_client_that_never_reads_is_aborted_after_the_idle_timeout():
    r = Rig()
    r.session.client_eof()
    r.advance(r.timeouts.idle + 1)
    assert r.io.aborted


def test_closed_ignores_every_event():
    r = Rig()
    r.send(GET)
    link = r.link()
    r.session.client_lost()
    before = len(r.io.records)
    r.send(GET)
    r.session.client_eof()
    link.handle = object()
    r.session.upstream_connected(link)
    r.session.upstream_data(link, OK)
    r.session.upstream_lost(link)
    r.advance(10_000)
    assert r.received() == b"" and len(r.io.records) == before


# --- drain --------------------------------------------------------------------------


def test_drain_closes_a_connection_idle_long_enough():
    r = Rig()
    r.advance(2)
    r.session.drain(1.0)
    assert r.state is State.CLOSING


def test_drain_lets_the_current_response_finish_and_closes_after_it():
    r = Rig()
    r.send(GET)
    r.connect()
    r.session.drain(1.0)
    assert r.state is State.AWAITING
    r.answer(OK)
    assert b"Connection: close" in r.received()
    assert r.state is State.CLOSING


def test_drain_timeout_records_every_exchange_in_progress_as_aborted():
    r = Rig()
    r.send(GET)
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    r.session.abort("drain")
    [record] = r.io.records
    assert (record.result, record.incomplete) == ("TCP_MISS_ABORTED", "drain")
    r = Rig()
    r.send(b"GET / HTTP/1.1\r\n")  # a head still arriving
    r.session.abort("drain")
    [record] = r.io.records
    assert record.result == "NONE_ABORTED" and r.io.aborted


# --- HTTP semantics -----------------------------------------------------------------


def test_an_http10_client_gets_a_chunked_response_dechunked_and_delimited_by_close():
    r = Rig()
    r.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n")
    r.answer(b"5\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n")
    data = r.received()
    start, fields = head_fields(data)
    assert start == b"HTTP/1.1 200 OK"
    assert not any(f.lower().startswith(b"transfer-encoding") for f in fields)
    assert b"Connection: close" in fields
    assert data.endswith(b"\r\n\r\nwikipedia")
    assert r.state is State.CLOSING


def test_an_http10_client_keeps_its_connection_only_when_the_length_is_known():
    r = Rig()
    r.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r.connect()
    r.answer(OK)
    data = r.received()
    assert b"Connection: keep-alive" in data and data.endswith(b"hello")
    assert r.state is State.IDLE


def test_an_http10_request_without_host_gets_the_original_destination_as_host():
    r = Rig()
    r.send(b"GET /x HTTP/1.0\r\n\r\n")
    r.connect()
    start, fields = head_fields(r.sent())
    assert start == b"GET /x HTTP/1.1"
    assert fields[0] == b"Host: 203.0.113.2"
    r = Rig(destination=("2001:db8:2::2", 8080))
    r.send(b"GET /x HTTP/1.0\r\n\r\n")
    r.connect()
    assert b"Host: [2001:db8:2::2]:8080" in head_fields(r.sent())[1]


def test_an_http10_request_without_host_on_a_forward_port_gets_the_urls_authority():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"GET http://203.0.113.2:8080/x HTTP/1.0\r\n\r\n")
    r.connect()
    assert b"Host: 203.0.113.2:8080" in head_fields(r.sent())[1]


@pytest.mark.parametrize("host", [b"example.com:0", b"example.com:99999", b"a:b"])
def test_an_invalid_host_authority_is_400_before_connecting(host):
    r = Rig()
    r.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert r.received().startswith(b"HTTP/1.1 400 ")
    assert r.io.connects == []


def test_host_verify_strict_compares_the_absolute_form_authority_really_sent():
    r = Rig(extra="host_verify_strict = true\n")
    r.send(b"GET http://192.0.2.1/ HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
    assert r.received().startswith(b"HTTP/1.1 409 ")
    assert r.io.connects == []


def test_an_absolute_form_with_another_scheme_on_a_tproxy_port_is_400():
    r = Rig()
    r.send(b"GET https://203.0.113.2/ HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
    assert r.received().startswith(b"HTTP/1.1 400 ")
    assert r.io.connects == []


def test_a_101_to_a_request_that_did_not_ask_to_upgrade_is_502_and_none_of_it_is_relayed():
    r = Rig()
    r.send(GET)
    link = r.connect()
    r.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: upgrade\r\n\r\nxx")
    data = r.received()
    assert data.startswith(b"HTTP/1.1 502 ") and b"101" not in data.split(b"\r\n", 1)[0]
    assert b"Upgrade" not in data and b"xx" not in data
    assert id(link) in r.io.upstream_closed
    assert r.io.records[-1].upstream_error == "bad_response"


def test_upgrade_in_an_http10_request_is_removed():
    r = Rig()
    r.send(b"GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    r.connect()
    sent = r.sent().lower()
    assert b"upgrade" not in sent


def test_bytes_after_a_complete_response_discard_the_upstream_connection():
    r = Rig()
    r.send(GET)
    first = r.connect()
    r.answer(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert r.received().endswith(b"hello")
    assert id(first) in r.io.upstream_closed
    r.send(GET)
    assert len(r.io.connects) == 2  # a fresh connection, never the smuggled response
    second = r.connect()
    r.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood", second)
    assert r.received().endswith(b"good")


def test_bytes_from_an_idle_upstream_discard_it():
    r = Rig()
    r.send(GET)
    first = r.connect()
    r.answer(OK)
    r.answer(b"HTTP/1.1 200 OK\r\n\r\n", first)
    assert id(first) in r.io.upstream_closed


def test_an_invalid_first_chunk_size_with_the_head_is_400_before_connecting():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n")
    assert r.received().startswith(b"HTTP/1.1 400 ")
    assert r.io.connects == []


def test_a_valid_first_chunk_with_the_head_is_relayed():
    r = Rig()
    r.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    r.connect()
    assert r.sent().endswith(b"\r\n\r\n2\r\nab\r\n0\r\n\r\n")


def test_a_half_closed_client_gets_its_response_then_the_connection_closes():
    r = Rig()
    r.send(GET)
    r.session.client_eof()
    r.connect()
    r.answer(OK)
    assert r.received().endswith(b"hello")
    assert r.state is State.CLOSING


def test_requests_fully_received_before_the_fin_are_all_answered():
    r = Rig()
    r.send(GET + GET.replace(b"/a", b"/b"))
    r.session.client_eof()
    link = r.connect()
    assert PIPELINE in r.io.paused
    r.answer(OK)
    assert b"GET /b" in r.sent(link)
    r.answer(OK)
    assert r.received().count(b"hello") == 2
    assert r.state is State.CLOSING
    assert len(r.io.records) == 2


def test_out_of_descriptors_is_503_no_descriptors_and_logged_once_per_interval():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        r = Rig()
        emfile = neterror.ConnectBindError(errno.EMFILE, "Too many open files")
        r.send(GET)
        r.session.upstream_failed(r.link(), emfile)
        data = r.received()
        assert data.startswith(b"HTTP/1.1 503 ")
        assert r.io.records[-1].upstream_error == "no_descriptors"
        for _ in range(3):
            other = Session(r.config, FakeIO(), r.clock, CLIENT_IP, ORIGIN)
            other.client_data(GET)
            other.upstream_failed(other._io.connects[-1][0], emfile)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if "file descriptors" in e.get("log_format", "")]
    assert len(lines) == 1
    assert "CAP_NET_ADMIN" not in lines[0]["log_format"]


# --- the random interleavings -------------------------------------------------------

REQUESTS = [
    GET,
    b"GET /c HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /old HTTP/1.0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 router (tproxy-twist)\r\n\r\n",
    b"NOT HTTP\r\n\r\n",
]
RESPONSES = [
    OK,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"garbage\r\n\r\n",
    # Long enough to be spliced (the machine's splice_body_min is 100), twice as likely.
    b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"s" * 300,
    b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"s" * 300,
]
_FINAL_HEAD = re.compile(rb"HTTP/1\.[01] [2-5][0-9][0-9] ")
_SWITCHING = re.compile(rb"HTTP/1\.[01] 101 [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n")


def _answers(out: bytes) -> int:
    """Final responses the client got: after a 101 the bytes are a tunnel's, not answers."""
    switched = _SWITCHING.search(out)
    if switched is not None:
        out = out[: switched.end()]
    return len(_FINAL_HEAD.findall(out))


_ERRORS = [
    neterror.ConnectionRefusedError(),
    neterror.TimeoutError(),
    neterror.ConnectBindError(errno.EMFILE, "Too many open files"),
    neterror.ConnectBindError(errno.EADDRNOTAVAIL, "Cannot assign"),
]


class SessionMachine(RuleBasedStateMachine):
    """Random client, upstream and timer events against one session."""

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(top="[limits]\nsplice_body_min = 100\n")
        self.session = self.rig.session
        self.io = self.rig.io
        self.to_send = b""
        self.requests_started = 0
        self.eof = False
        self.lost = False
        self.upstream_pending = b""
        self.upstream_gone: set[int] = set()
        self.splicing = 0  # bytes the adapter took over (SPLICING), or 0
        self.written_before_splice = 0
        self.close_delimited = False  # a response whose body ends with the close was queued

    @property
    def adapter_reads(self) -> bool:
        """While a body is spliced the adapter reads neither connection."""
        return self.session.state is not State.SPLICING

    def _live_link(self) -> Link | None:
        for link in reversed(self.io.attached):
            if id(link) not in self.upstream_gone:
                return link
        return None

    # Every example starts with a request on its way (else most examples would
    # end before an upstream connection is made: uniform rule choice reaches
    # the client's end and the long timeouts as often as anything else), and
    # the events that end the session are drawn rarely (1 in 8 tries).

    @initialize(request=st.sampled_from(REQUESTS), response=st.sampled_from(RESPONSES))
    def a_request_is_on_its_way(self, request, response):
        self.requests_started = 1
        self.upstream_queues_a_response(response)
        self.session.client_data(request)

    @rule(request=st.sampled_from(REQUESTS))
    def client_queues_a_request(self, request):
        if not self.eof:
            self.to_send += request
            self.requests_started += 1

    @rule(n=st.integers(1, 120))
    def client_sends(self, n):
        if self.to_send and not self.eof and not self.lost and self.adapter_reads:
            piece, self.to_send = self.to_send[:n], self.to_send[n:]
            self.session.client_data(piece)

    @rule(chance=st.integers(0, 7))
    def client_shuts_its_side(self, chance):
        if not chance and not self.eof and not self.lost and self.adapter_reads:
            self.eof = True
            self.session.client_eof()

    @rule(chance=st.integers(0, 7))
    def client_connection_ends(self, chance):
        # The transport ends after close()/abort(), or the client resets it.
        if not self.lost and (not chance or self.io.closing or self.io.aborted):
            self.lost = True
            self.session.client_lost()

    @rule()
    def connect_succeeds(self):
        for link, _, _ in self.io.connects:
            if link.handle is None:
                link.handle = object()
                self.session.upstream_connected(link)
                return

    @rule(error=st.sampled_from(_ERRORS), chance=st.integers(0, 7))
    def connect_fails(self, error, chance):
        if chance:
            return
        for link, _, _ in self.io.connects:
            if link.handle is None:
                link.handle = "failed"
                self.session.upstream_failed(link, error)
                return

    @rule(response=st.sampled_from(RESPONSES))
    def upstream_queues_a_response(self, response):
        # Nothing follows a body delimited by the close: what the origin sent
        # after it would be that body's bytes (the output's head count would
        # see a response in them).
        if not self.close_delimited:
            self.upstream_pending += response
            self.close_delimited = response.endswith(b"until close")

    @rule(n=st.integers(1, 120), splice=st.booleans())
    def upstream_sends(self, n, splice):
        link = self._live_link()
        if link is None or not self.upstream_pending or not self.adapter_reads:
            return
        piece, self.upstream_pending = self.upstream_pending[:n], self.upstream_pending[n:]
        if self.session.state is State.TUNNEL:
            piece = b"x" * len(piece)  # tunnel bytes: never a response head
        self.session.upstream_data(link, piece)
        if splice:  # as the adapter does after each read, when both sockets allow
            self.adapter_splices_the_body()

    @rule(chance=st.integers(0, 7))
    def upstream_closes(self, chance):
        link = self._live_link()
        if not chance and link is not None and self.adapter_reads:
            self.upstream_gone.add(id(link))
            self.session.upstream_lost(link)

    @rule()
    def adapter_splices_the_body(self):
        offered = self.session.body_to_splice()
        if offered and not self.lost:
            assert offered <= len(self.upstream_pending)
            self.session.splicing_body()
            self.splicing = offered
            self.written_before_splice = len(self.io.out)

    @rule(n=st.integers(1, 400))
    def spliced_bytes_move(self, n):
        if self.session.state is State.SPLICING:
            n = min(n, self.splicing)
            self.session.relayed(0, n)

    @rule()
    def spliced_body_completes(self):
        if self.session.state is State.SPLICING:
            self.upstream_pending = self.upstream_pending[self.splicing :]
            self.splicing = 0
            self.session.body_spliced()

    @rule(upstream=st.booleans())
    def spliced_body_breaks(self, upstream):
        if self.session.state is State.SPLICING:
            self.splicing = 0
            self.session.body_splice_failed(upstream=upstream)
            assert self.session.state is State.CLOSED

    @rule(seconds=st.sampled_from([0.1, 1.0, 2.5, 31.0, 61.0, 301.0]), chance=st.integers(0, 7))
    def time_passes(self, seconds, chance):
        if seconds > 2.5 and chance:
            seconds = 0.1  # long enough for a deadline: rarely
        self.rig.clock.advance(seconds)
        self.session.tick(self.rig.clock.seconds())

    @rule(chance=st.integers(0, 7))
    def drain(self, chance):
        if not chance:
            self.session.drain(1.0)

    @rule(chance=st.integers(0, 7))
    def drain_timeout(self, chance):
        if not chance:
            self.session.abort("drain")

    @invariant()
    def a_deadline_is_armed_whenever_the_session_waits_on_the_network(self):
        if self.session.state is not State.CLOSED:
            assert self.session.deadline is not None, self.session.state

    @invariant()
    def at_most_one_response_per_request(self):
        answered = _answers(bytes(self.io.out))
        assert answered <= max(self.requests_started, 1)

    @invariant()
    def nothing_is_written_to_the_client_while_its_body_is_spliced(self):
        if self.session.state is State.SPLICING:
            assert len(self.io.out) == self.written_before_splice
            assert not (self.io.closing or self.io.aborted)

    @invariant()
    def records_never_outnumber_requests(self):
        assert len(self.io.records) <= max(self.requests_started, 1)

    def teardown(self):
        if not self.lost:
            self.session.client_lost()
        answered = _answers(bytes(self.io.out))
        # Every answer that reached the client belongs to one record.
        assert answered <= len(self.io.records)


SessionMachine.TestCase.settings = settings(
    max_examples=200 * int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_interleavings_keep_the_session_invariants = SessionMachine.TestCase


class BodySpliceMachine(RuleBasedStateMachine):
    """
    Random events around a spliced body: the session starts RESPONDING a long
    Content-Length body (split anywhere), and the adapter may take the rest
    over at any read, move bytes, finish or break it, while timers, drain,
    the drain timeout, pipelined requests and the client's end interleave.
    """

    BODY = 3000

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(top="[limits]\nsplice_body_min = 500\n[timeouts]\nidle = 30\n")
        self.session = self.rig.session
        self.io = self.rig.io
        self.lost = False
        self.splicing = 0
        self.pending = b""
        self.written_before = 0
        self.requests = 1
        self.spliced_bodies = 0

    @initialize(first=st.integers(1, 200), pipelined=st.booleans())
    def responding(self, first, pipelined):
        request = GET + (b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n" if pipelined else b"")
        self.requests += pipelined
        self.session.client_data(request)
        self.link = self.rig.connect()
        self.pending = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.BODY
        self.pending += b"b" * self.BODY + OK * 2
        self.upstream_sends(first)

    @rule(n=st.integers(1, 1500))
    def upstream_sends(self, n):
        if self.session.state is State.SPLICING or self.lost or not self.pending:
            return
        piece, self.pending = self.pending[:n], self.pending[n:]
        self.session.upstream_data(self.link, piece)

    @rule()
    def adapter_takes_the_body(self):
        offered = self.session.body_to_splice()
        if offered and not self.lost:
            # Exactly the bytes still to come of this body.
            assert self.pending[:offered] == b"b" * offered
            assert self.pending[offered : offered + 1] in (b"", b"H")
            self.session.splicing_body()
            self.splicing = offered
            self.moved = 0
            self.written_before = len(self.io.out)

    @rule(n=st.integers(1, 3000))
    def bytes_move(self, n):
        if self.session.state is State.SPLICING:
            n = min(n, self.splicing - self.moved)
            self.moved += n
            self.session.relayed(0, n)

    @rule()
    def body_completes(self):
        if self.session.state is State.SPLICING:
            # As the adapter does: the last bytes moved are reported, then the end.
            self.session.relayed(0, self.splicing - self.moved)
            self.pending = self.pending[self.splicing :]
            self.splicing = self.moved = 0
            self.spliced_bodies += 1
            self.session.body_spliced()
            assert self.session.state is not State.SPLICING

    @rule(upstream=st.booleans())
    def body_breaks(self, upstream):
        if self.session.state is State.SPLICING:
            self.splicing = 0
            self.session.body_splice_failed(upstream=upstream)
            assert self.session.state is State.CLOSED and self.io.aborted

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0]))
    def time_passes(self, seconds):
        self.rig.clock.advance(seconds)
        self.session.tick(self.rig.clock.seconds())

    @rule()
    def drain(self):
        self.session.drain(1.0)

    @rule()
    def drain_timeout(self):
        self.session.abort("drain")

    @rule()
    def client_connection_ends(self):
        if not self.lost:
            self.lost = True
            self.session.client_lost()

    @invariant()
    def the_session_is_silent_towards_the_client_while_the_adapter_splices(self):
        if self.session.state is State.SPLICING:
            assert len(self.io.out) == self.written_before
            assert not (self.io.closing or self.io.aborted)
            assert self.session.deadline_kind is Deadline.IDLE

    @invariant()
    def each_exchange_is_recorded_at_most_once(self):
        assert len(self.io.records) <= self.requests

    def teardown(self):
        if not self.lost:
            self.session.client_lost()
        records = self.io.records
        assert len(records) <= self.requests
        complete = [r for r in records if r.incomplete is None and r.status == 200]
        # A body spliced to its end is a whole response, counted with every byte.
        if self.spliced_bodies:
            assert complete and complete[0].bytes_out > self.BODY


BodySpliceMachine.TestCase.settings = settings(
    max_examples=200 * int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_events_around_a_spliced_body_keep_the_session_invariants = BodySpliceMachine.TestCase
