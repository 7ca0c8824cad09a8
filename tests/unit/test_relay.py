"""
The relay on fake transports and a fake clock: where it connects, from
which address, what it sends each way, and every failure's answer.
"""

from __future__ import annotations

import errno
import itertools
import os
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import error as neterror
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.http.relay import ProxyFactory, RelaySettings
from tproxy_twist.http.session import State
from tproxy_twist.metrics import PortMetrics
from tproxy_twist.testing import FakeConnect, FakeTransport, tcp_address

CLIENT = ("198.51.100.2", 40001)
ORIGIN = ("203.0.113.2", 80)
ROUTER_ADDRESSES = frozenset({"198.51.100.1", "203.0.113.1", "2001:db8:1::1"})
_names = itertools.count()

GET = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Harness:
    """One client connection to a proxy port, with a fake upstream and clock."""

    def __init__(
        self,
        mode: str = "tproxy",
        extra: str = "",
        *,
        destination: tuple[str, int] = ORIGIN,
        client: tuple[str, int] = CLIENT,
        timeouts: str = "",
    ) -> None:
        self.name = f"t{next(_names)}"
        listen = "[::]:3129" if mode != "forward" else "0.0.0.0:3128"
        text = f'{timeouts}[[port]]\nname = "{self.name}"\nlisten = "{listen}"\nmode = "{mode}"\n'
        config = C.loads(text + extra)
        self.port = config.ports[0]
        self.clock = Clock()
        self.connect = FakeConnect()
        self.registry = CollectorRegistry()  # this test's own: no state shared with others
        self.factory = ProxyFactory(
            self.port,
            settings=RelaySettings(
                timeouts=config.timeouts, limits=config.limits, pseudonym="router"
            ),
            connect=self.connect,
            clock=self.clock,
            local_addresses=ROUTER_ADDRESSES,
            metrics=PortMetrics(self.name, mode, self.registry),
            access_log=self,
        )
        self.entries = []
        self.protocol = self.factory.buildProtocol(None)
        self.transport = FakeTransport(host=tcp_address(*destination), peer=tcp_address(*client))
        self.protocol.makeConnection(self.transport)

    def log(self, entry) -> None:
        self.entries.append(entry)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.take()

    def upstream(self) -> FakeTransport:
        """Complete the pending upstream connection and return its transport."""
        return self.connect.last.succeed()

    def answer(self, data: bytes) -> None:
        self.connect.last.protocol.dataReceived(data)

    def requests(self, **labels) -> float:
        self.factory.metrics.flush()
        labels = {"port": self.name, **labels}
        total = 0.0
        for metric in self.registry.collect():
            if metric.name != "tproxy_requests":
                continue
            for sample in metric.samples:
                if sample.name.endswith("_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def metric(self, name: str, **labels) -> float:
        self.factory.metrics.flush()
        return self.registry.get_sample_value(name, {"port": self.name, **labels}) or 0.0


def head_of(data: bytes) -> tuple[bytes, list[bytes]]:
    head = data.split(b"\r\n\r\n", 1)[0]
    start, *fields = head.split(b"\r\n")
    return start, fields


# --- where and from where ---------------------------------------------------------


def test_request_goes_to_original_destination_from_the_clients_address():
    h = Harness()
    h.send(GET)
    attempt = h.connect.last
    assert (attempt.host, attempt.port) == ORIGIN
    assert attempt.source_ip == "198.51.100.2"
    assert attempt.timeout == 10.0


def test_host_header_never_chooses_the_destination_on_a_tproxy_port():
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: 192.0.2.99:8080\r\n\r\n")
    assert (h.connect.last.host, h.connect.last.port) == ORIGIN


def test_absolute_form_on_a_tproxy_port_still_goes_to_the_original_destination():
    h = Harness()
    h.send(b"GET http://192.0.2.99:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (h.connect.last.host, h.connect.last.port) == ORIGIN
    sent = h.upstream().value()
    start, fields = head_of(sent)
    assert start == b"GET /x?y HTTP/1.1"
    assert b"Host: 192.0.2.99:8080" in fields


def test_ipv4_mapped_client_and_destination_are_spoofed_as_ipv4():
    h = Harness(destination=("::ffff:203.0.113.2", 80), client=("::ffff:198.51.100.2", 5))
    h.send(GET)
    assert h.connect.last.host == "203.0.113.2"
    assert h.connect.last.source_ip == "198.51.100.2"


def test_ipv6_client_is_spoofed_with_its_ipv6_address():
    h = Harness(destination=("2001:db8:2::2", 80), client=("2001:db8:1::2", 5))
    h.send(GET)
    assert (h.connect.last.host, h.connect.last.source_ip) == ("2001:db8:2::2", "2001:db8:1::2")


def test_spoofing_off_connects_from_the_routers_own_address():
    h = Harness(extra="spoof_client_ip = false\n")
    h.send(GET)
    assert h.connect.last.source_ip is None


# --- what is sent ---------------------------------------------------------------


def test_hop_by_hop_headers_are_removed_and_via_added_upstream():
    h = Harness()
    h.send(
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nX-End: 2\r\n\r\n"
    )
    start, fields = head_of(h.upstream().value())
    names = {f.split(b":")[0].lower() for f in fields}
    assert start == b"GET / HTTP/1.1"
    assert names == {b"host", b"x-end", b"via"}
    assert b"Via: 1.1 router (tproxy-twist)" in fields


def test_existing_via_is_extended():
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 other\r\n\r\n")
    sent = h.upstream().value()
    assert b"1.1 other, 1.1 router (tproxy-twist)" in sent


def test_response_is_relayed_with_via_and_the_connection_stays_open():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
    data = h.received()
    start, fields = head_of(data)
    assert start == b"HTTP/1.1 200 OK"
    assert b"Via: 1.1 router (tproxy-twist)" in fields
    assert not any(f.lower().startswith(b"connection") for f in fields)
    assert data.endswith(b"\r\n\r\nhello")
    assert not h.transport.closed


def test_keep_alive_reuses_one_pinned_upstream_connection():
    h = Harness()
    h.send(GET)
    upstream = h.upstream()
    for _ in range(3):
        h.answer(OK)
        h.send(GET)
    assert len(h.connect.attempts) == 1
    assert upstream.value().count(b"GET /index.html") == 4
    assert h.received().count(b"hello") == 3


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    h = Harness()
    h.send(GET.replace(b"index", b"one") + GET.replace(b"index", b"two"))
    upstream = h.upstream()
    assert b"/one.html" in upstream.value() and b"/two.html" not in upstream.value()
    assert h.transport.producerState == "paused"  # the second waits in the kernel
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    assert b"/two.html" in upstream.value()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    body = h.received()
    assert body.index(b"one") < body.index(b"two")
    assert h.transport.producerState == "producing"


def test_content_length_body_streams_as_it_arrives():
    h = Harness()
    h.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
    upstream = h.upstream()
    assert upstream.take().endswith(b"\r\n\r\n01234")
    h.send(b"56789")
    assert upstream.take() == b"56789"


def test_chunked_request_body_is_rechunked_with_trailers():
    h = Harness()
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream = h.upstream()
    h.send(b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nContent-Digest: sha-256=:9=:\r\n\r\n")
    sent = upstream.value()
    assert b"Transfer-Encoding: chunked" in sent
    assert sent.endswith(
        b"\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\nContent-Digest: sha-256=:9=:\r\n\r\n"
    )


def test_chunked_response_is_relayed_chunked():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n")
    data = h.received()
    assert b"Transfer-Encoding: chunked" in data
    assert data.endswith(b"4\r\nwiki\r\n0\r\n\r\n")


def test_close_delimited_response_is_chunked_for_an_http11_client_which_stays_open():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\n\r\nsome bytes")
    h.connect.last.close()
    data = h.received()
    assert b"Transfer-Encoding: chunked" in data
    assert data.endswith(b"a\r\nsome bytes\r\n0\r\n\r\n")
    assert not h.transport.closed
    h.send(GET)
    assert len(h.connect.attempts) == 2  # a fresh upstream for the next request


def test_close_delimited_response_to_an_http10_client_closes_it():
    h = Harness()
    h.send(b"GET / HTTP/1.0\r\n\r\n")
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\n\r\nsome bytes")
    h.connect.last.close()
    data = h.received()
    assert b"Transfer-Encoding" not in data and b"Connection: close" in data
    assert data.endswith(b"some bytes")
    assert h.transport.closed


def test_head_response_has_no_body_and_keeps_content_length():
    h = Harness()
    h.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    h.send(GET)
    assert h.received().endswith(b"Content-Length: 1000\r\nVia: 1.1 router (tproxy-twist)\r\n\r\n")
    assert h.connect.last.transport.value().count(b"GET /index.html") == 1


def test_expect_100_continue_is_relayed_both_ways():
    h = Harness()
    h.send(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    upstream = h.upstream()
    assert b"Expect: 100-continue" in upstream.value()
    h.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert h.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.send(b"ok")
    h.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert upstream.value().endswith(b"ok")
    assert h.received().startswith(b"HTTP/1.1 201 Created")


def test_websocket_upgrade_becomes_a_byte_tunnel_after_101():
    h = Harness()
    h.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
    upstream = h.upstream()
    sent = upstream.take()
    assert b"Upgrade: websocket" in sent and b"Connection: upgrade" in sent.replace(b"U", b"u")
    h.answer(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi"
    )
    data = h.received()
    assert data.startswith(b"HTTP/1.1 101") and b"Upgrade: websocket" in data
    assert data.endswith(b"hi")
    assert upstream.take() == b"early"
    h.send(b"\x81\x00 not http at all")
    assert upstream.take() == b"\x81\x00 not http at all"
    h.answer(b"GET / HTTP/1.1\r\n")  # tunnel bytes, never parsed
    assert h.received() == b"GET / HTTP/1.1\r\n"


def test_a_tunnel_whose_sockets_cannot_be_spliced_is_copied_with_backpressure_both_ways():
    h = Harness()
    started = []
    h.factory.stream_metrics = SimpleNamespace(started=started.append)
    h.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    upstream = h.upstream()
    h.answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    # Fake transports are not TCP sockets: no pump, the bytes go through Twisted.
    assert started == ["copy"] and h.protocol.pump is None
    assert h.transport.producer is h.connect.last.protocol.gate
    assert upstream.producer is h.protocol.gate
    h.send(b"up")
    assert upstream.take().endswith(b"up")


class PumpStandIn:
    """What the relay reads of a SplicePump: its end, its byte counts, abort()."""

    def __init__(self, now: float) -> None:
        self.ended = None
        self.last_activity = now
        self.a_to_b = self.b_to_a = 0
        self.aborts = 0

    def abort(self) -> None:
        self.aborts += 1
        self.ended = "aborted"


def test_a_spliced_tunnel_moving_bytes_is_not_idle_and_a_silent_one_times_out():
    h = Harness(timeouts="[timeouts]\nidle = 5\n")
    h.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    h.upstream()
    h.answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    pump = h.protocol.pump = PumpStandIn(h.clock.seconds())
    for _ in range(24 * 4):  # 24 s, bytes moving all along (the session sees none of them)
        h.clock.advance(0.25)  # the sweep's interval
        pump.last_activity = h.clock.seconds()
        pump.b_to_a += 1000
    assert pump.aborts == 0
    for _ in range(6 * 4):  # nothing moves for longer than the idle timeout
        h.clock.advance(0.25)
    assert pump.aborts >= 1 and pump.ended == "aborted"


def test_a_long_body_is_copied_when_the_transports_cannot_splice_and_keep_alive_goes_on():
    # Fake transports are not sockets: the body goes through the worker as before.
    h = Harness()
    assert h.factory.splice_bodies
    h.send(GET)
    h.upstream()
    body = os.urandom(1 << 20)
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
    h.answer(body[1000:])
    assert h.protocol.body is None
    assert h.received().endswith(b"\r\n\r\n" + body)
    assert h.protocol.session.state is State.IDLE
    [entry] = h.entries
    assert entry.bytes_out > len(body)


def test_response_timing_out_mid_upload_is_not_waited_for_forever():
    h = Harness(timeouts="[timeouts]\nidle = 5\n")
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01")
    h.upstream()
    h.clock.advance(6)
    assert h.received().startswith(b"HTTP/1.1 504 ")


# --- failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "exception, status, reason",
    [
        (neterror.ConnectionRefusedError(), 502, "refused"),
        (neterror.TimeoutError(), 504, "timeout"),
        (neterror.NoRouteError(), 502, "unreachable"),
        (neterror.ConnectBindError(errno.EADDRNOTAVAIL, "Cannot assign"), 502, "spoof"),
        (neterror.ConnectBindError(errno.EPERM, "Operation not permitted"), 502, "spoof"),
    ],
)
def test_upstream_connect_failures_are_answered_and_counted(exception, status, reason):
    h = Harness()
    h.send(GET)
    h.connect.last.fail(exception)
    data = h.received()
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in data
    assert b"cannot connect to 203.0.113.2:80" in data
    assert h.metric("tproxy_upstream_errors_total", reason=reason) == 1
    assert h.requests(code=str(status), method="GET") == 1
    assert h.transport.write_closed


def test_spoofing_failure_logs_the_likely_cause(caplog):
    from twisted.logger import LogLevel, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        h = Harness()
        h.send(GET)
        h.connect.last.fail(neterror.ConnectBindError(errno.EADDRNOTAVAIL, "x"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    errors = [e for e in seen if e.get("log_level") == LogLevel.error]
    assert errors and "errno 99" in errors[0]["log_format"].format(**errors[0])
    assert "CAP_NET_ADMIN" in errors[0]["log_format"]


def test_upstream_that_does_not_answer_gets_504_after_the_response_timeout():
    h = Harness(timeouts="[timeouts]\nresponse = 3\n")
    h.send(GET)
    upstream = h.upstream()
    h.clock.advance(2.9)
    assert h.received() == b""
    h.clock.advance(0.2)
    data = h.received()
    assert data.startswith(b"HTTP/1.1 504 ")
    assert b"did not answer within 3 seconds" in data
    assert upstream.closed
    assert h.metric("tproxy_upstream_errors_total", reason="timeout") == 1


def test_direct_connection_to_the_tproxy_port_is_refused_without_connecting():
    h = Harness(destination=("198.51.100.1", 3129))
    h.send(GET)
    data = h.received()
    assert data.startswith(b"HTTP/1.1 403 ")
    assert b"only serves intercepted traffic" in data
    assert h.connect.attempts == []
    assert h.metric("tproxy_rejected_total", reason="loop") == 1


def test_our_own_via_on_a_request_is_a_loop_answered_508():
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 router (tproxy-twist)\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 508 ")
    assert h.connect.attempts == []


def test_malformed_request_gets_400_with_the_reason_and_no_upstream():
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    data = h.received()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert h.connect.attempts == []
    assert h.metric("tproxy_rejected_total", reason="bad_request") == 1
    assert h.transport.write_closed
    h.clock.advance(5)
    assert h.transport.disconnected  # lingering close ends


def test_invalid_upstream_response_gets_502_and_the_upstream_is_closed():
    h = Harness()
    h.send(GET)
    upstream = h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 502 ")
    assert upstream.closed
    assert h.metric("tproxy_upstream_errors_total", reason="bad_response") == 1


def test_upstream_closing_before_answering_gets_502():
    h = Harness()
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    h.upstream()
    h.connect.last.close(neterror.ConnectionLost())
    assert h.received().startswith(b"HTTP/1.1 502 ")


def test_get_on_a_reused_connection_the_origin_just_closed_is_resent_once():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(OK)
    h.send(GET)
    h.connect.last.close()
    assert len(h.connect.attempts) == 2
    h.upstream()
    h.answer(OK)
    assert h.received().count(b"hello") == 2


def test_truncated_response_body_aborts_the_client_connection():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    h.connect.last.close(neterror.ConnectionLost())
    assert h.transport.disconnected
    assert h.metric("tproxy_upstream_errors_total", reason="reset") == 1


def test_client_going_away_closes_its_upstream():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h = Harness()
    h.send(GET)
    upstream = h.upstream()
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert upstream.disconnected


def test_request_head_that_never_completes_gets_408():
    h = Harness(timeouts="[timeouts]\nrequest_header = 2\n")
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.clock.advance(2.1)
    assert h.received().startswith(b"HTTP/1.1 408 ")


def test_idle_keep_alive_client_is_closed_quietly():
    h = Harness(timeouts="[timeouts]\nclient_idle = 4\n")
    h.clock.advance(4.1)
    assert h.received() == b""
    assert h.transport.closed


def test_backpressure_both_ways():
    h = Harness()
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    upstream = h.upstream()
    # The upstream's send buffer fills: stop reading from the client.
    upstream.producer.pauseProducing()
    assert h.transport.producerState == "paused"
    upstream.producer.resumeProducing()
    assert h.transport.producerState == "producing"
    # The client's send buffer fills: stop reading from the upstream.
    h.transport.producer.pauseProducing()
    assert upstream.producerState == "paused"


def test_requests_are_counted_by_method_and_code_including_our_own_answers():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(OK)
    h.send(b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.answer(b"HTTP/1.1 418 Teapot\r\nContent-Length: 0\r\n\r\n")
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.0 router (tproxy-twist)\r\n\r\n")
    assert h.requests(method="GET", code="200", mode="tproxy") == 1
    assert h.requests(method="other", code="418") == 1
    assert h.requests(method="GET", code="508") == 1
    assert h.metric("tproxy_connections_total") == 1
    assert h.metric("tproxy_bytes_total", direction="out") > 0


# --- forward ports ----------------------------------------------------------------

FORWARD_ALLOW = 'allow = ["198.51.100.0/24"]\n'


def test_forward_port_connects_to_the_absolute_url_without_spoofing():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"GET http://203.0.113.2:8080/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    attempt = h.connect.last
    assert (attempt.host, attempt.port, attempt.source_ip) == ("203.0.113.2", 8080, None)
    start, fields = head_of(h.upstream().value())
    assert start == b"GET /p?q=1 HTTP/1.1"
    assert b"Host: 203.0.113.2:8080" in fields


def test_forward_port_switches_upstream_when_the_destination_changes():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"GET http://203.0.113.2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    first = h.upstream()
    h.answer(OK)
    h.send(b"GET http://203.0.113.3/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.closed
    assert h.connect.last.host == "203.0.113.3"


def test_forward_port_refuses_clients_outside_its_allow_list():
    h = Harness("forward", destination=("198.51.100.1", 3128))  # default: private ranges
    h.send(b"GET http://203.0.113.2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 403 ")
    assert h.connect.attempts == []
    assert h.metric("tproxy_rejected_total", reason="forbidden") == 1


def test_forward_port_needs_absolute_form():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(GET)
    assert h.received().startswith(b"HTTP/1.1 400 ")


def test_connect_tunnel_on_an_allowed_port():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n\x16\x03tls")
    assert (h.connect.last.host, h.connect.last.port) == ("203.0.113.2", 443)
    upstream = h.upstream()
    assert h.received() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert upstream.take() == b"\x16\x03tls"
    h.answer(b"server bytes")
    assert h.received() == b"server bytes"
    h.connect.last.close()
    assert h.transport.closed


def test_connect_tunnel_carries_bytes_the_client_sends_after_the_200():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
    upstream = h.upstream()
    assert h.received() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert h.transport.producerState == "producing"
    h.send(b"client hello")
    assert upstream.take() == b"client hello"
    h.clock.advance(100)  # no response timeout in a tunnel
    assert h.received() == b""


def test_connect_to_a_port_not_allowed_is_403():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"CONNECT 203.0.113.2:25 HTTP/1.1\r\nHost: 203.0.113.2:25\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 403 ")
    assert h.connect.attempts == []


def test_connect_on_a_tproxy_port_is_not_allowed():
    h = Harness()
    h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 405 ")
    assert h.connect.attempts == []


# --- access log entries -------------------------------------------------------------


def test_each_request_gives_one_access_log_entry_with_squid_fields():
    h = Harness()
    h.send(b"GET /a?b HTTP/1.1\r\nHost: example.com\r\n\r\n")
    h.upstream()
    h.clock.advance(0.25)
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi")
    [entry] = h.entries
    assert (entry.client, entry.method, entry.url, entry.status) == (
        "198.51.100.2",
        "GET",
        "http://example.com/a?b",
        200,
    )
    assert entry.result == "TCP_MISS"
    assert entry.destination == "203.0.113.2:80"
    assert entry.content_type == "text/html"
    assert entry.duration == 0.25
    assert entry.bytes_out == len(h.received())


def test_requests_the_proxy_answers_itself_are_logged_too():
    h = Harness(destination=("198.51.100.1", 3129))
    h.send(GET)
    [entry] = h.entries
    assert (entry.status, entry.result, entry.destination) == (403, "TCP_DENIED", None)
    assert entry.url == "http://example.com/index.html"
    h = Harness()
    h.send(GET)
    h.connect.last.fail(neterror.ConnectionRefusedError())
    [entry] = h.entries
    assert (entry.status, entry.result) == (502, "NONE")
    h = Harness()
    h.send(b"GARBAGE\r\n\r\n")
    [entry] = h.entries
    assert entry.status == 400


def test_connect_tunnel_is_logged_as_tcp_tunnel_with_its_authority():
    h = Harness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))
    h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
    h.upstream()
    h.connect.last.close()
    [entry] = h.entries
    assert (entry.url, entry.result, entry.status) == ("203.0.113.2:443", "TCP_TUNNEL", 200)


# --- hardening: limits, Host verification, X-Forwarded-For ----------------------------


def test_a_body_over_max_body_size_is_refused_with_413_before_connecting():
    h = Harness(timeouts="[limits]\nmax_body_size = 10\n")
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 413 ")
    assert h.connect.attempts == []
    assert h.metric("tproxy_rejected_total", reason="limit") == 1


def test_a_chunked_body_growing_past_max_body_size_gets_413_and_the_upstream_is_dropped():
    h = Harness(timeouts="[limits]\nmax_body_size = 10\n")
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream = h.upstream()
    h.send(b"8\r\n12345678\r\n")
    assert h.received() == b""
    h.send(b"8\r\n12345678\r\n")
    assert h.received().startswith(b"HTTP/1.1 413 ")
    assert upstream.closed


def test_a_body_within_max_body_size_is_relayed():
    h = Harness(timeouts="[limits]\nmax_body_size = 10\n")
    h.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789")
    assert h.upstream().value().endswith(b"0123456789")


def test_connections_beyond_the_per_client_limit_get_429_and_others_are_unaffected():
    first = Harness(timeouts="[limits]\nmax_connections_per_client = 2\n")
    factory = first.factory

    def connect(client):
        protocol = factory.buildProtocol(None)
        transport = FakeTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*client))
        protocol.makeConnection(transport)
        return protocol, transport

    second = connect(CLIENT)
    _, third = connect(CLIENT)
    assert third.value().startswith(b"HTTP/1.1 429 ")
    assert b"too many connections from 198.51.100.2" in third.value()
    _, other = connect(("198.51.100.3", 5000))
    assert other.value() == b""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    second[0].connectionLost(Failure(ConnectionDone()))
    _, fourth = connect(CLIENT)
    assert fourth.value() == b""


def test_the_connection_budget_pauses_and_resumes_accepting():
    from tproxy_twist.http.relay import ConnectionBudget

    events = []
    budget = ConnectionBudget(2, lambda: events.append("full"), lambda: events.append("free"))
    budget.acquire()
    assert events == []
    budget.acquire()
    assert events == ["full"]
    budget.release()
    assert events == ["full", "free"]


@pytest.mark.parametrize(
    "host, mismatch",
    [
        (b"example.com", False),
        (b"203.0.113.2", False),
        (b"203.0.113.2:80", False),
        (b"[::ffff:203.0.113.2]", False),
        (b"192.0.2.1", True),
        (b"example.com:8080", True),
        (b"203.0.113.2:81", True),
    ],
)
def test_a_host_disagreeing_with_the_original_destination_is_counted_but_relayed(host, mismatch):
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert (h.connect.last.host, h.connect.last.port) == ORIGIN
    h.upstream()
    h.answer(OK)  # counted from the exchange's record, when it is finished
    assert h.metric("tproxy_host_mismatch_total") == (1 if mismatch else 0)


def test_host_verify_strict_answers_a_forged_host_with_409():
    h = Harness(extra="host_verify_strict = true\n")
    h.send(b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n")
    data = h.received()
    assert data.startswith(b"HTTP/1.1 409 ")
    assert b"does not match the destination" in data
    assert h.connect.attempts == []
    h = Harness(extra="host_verify_strict = true\n")
    h.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert h.connect.attempts  # a host name cannot be checked: relayed


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("off", [b"X-Forwarded-For: 192.0.2.9"]),
        ("append", [b"X-Forwarded-For: 192.0.2.9, 198.51.100.2"]),
        ("strip", []),
    ],
)
def test_x_forwarded_for_modes(mode, expected):
    h = Harness(extra=f'x_forwarded_for = "{mode}"\n')
    h.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.9\r\n\r\n")
    _, fields = head_of(h.upstream().value())
    assert [f for f in fields if f.lower().startswith(b"x-forwarded-for")] == expected


def test_the_relay_works_the_same_with_metrics_off():
    from tproxy_twist.metrics import NullPortMetrics

    h = Harness()
    h.factory.metrics = NullPortMetrics(h.name, "tproxy")
    h.protocol = h.factory.buildProtocol(None)
    h.transport = FakeTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
    h.protocol.makeConnection(h.transport)
    h.send(GET)
    h.upstream()
    h.answer(OK)
    assert h.received().endswith(b"hello")
    h.send(b"BAD\r\n\r\n")
    assert h.received().startswith(b"HTTP/1.1 400 ")
    assert h.requests() == 0


# --- half-closed clients, incomplete responses, descriptors ------------------------------


def test_a_client_that_shuts_its_sending_side_after_a_request_still_gets_the_response():
    from twisted.internet.interfaces import IHalfCloseableProtocol

    h = Harness()
    assert IHalfCloseableProtocol.providedBy(h.protocol)
    h.send(GET)
    h.protocol.readConnectionLost()
    h.upstream()
    h.answer(OK)
    assert h.received().endswith(b"hello")
    assert h.transport.closed
    [entry] = h.entries
    assert (entry.status, entry.result) == (200, "TCP_MISS")


def test_a_response_cut_off_by_the_origin_is_logged_aborted_and_counted_incomplete():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    h.connect.last.close(neterror.ConnectionLost())
    [entry] = h.entries
    assert (entry.status, entry.result) == (200, "TCP_MISS_ABORTED")
    assert h.metric("tproxy_responses_incomplete_total", reason="upstream") == 1


def test_the_drain_timeout_logs_every_connection_it_ends():
    h = Harness()
    h.send(GET)
    h.upstream()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    h.factory.abort_all()
    [entry] = h.entries
    assert entry.result == "TCP_MISS_ABORTED"
    assert h.transport.disconnecting
    assert h.metric("tproxy_responses_incomplete_total", reason="drain") == 1


def test_an_upstream_socket_failing_for_lack_of_descriptors_is_503_no_descriptors():
    h = Harness()
    h.send(GET)
    h.connect.last.fail(neterror.ConnectBindError(errno.EMFILE, "Too many open files"))
    data = h.received()
    assert data.startswith(b"HTTP/1.1 503 ")
    assert b"spoofing" not in data
    assert h.metric("tproxy_upstream_errors_total", reason="no_descriptors") == 1
    assert h.metric("tproxy_upstream_errors_total", reason="spoof") == 0


def test_port_metrics_on_their_own_registries_share_nothing():
    first, second = CollectorRegistry(), CollectorRegistry()
    a = PortMetrics("same", "tproxy", first)
    PortMetrics("same", "tproxy", second)
    a.request(b"GET", 200, 0.1)
    a.incomplete("client")
    a.flush()
    labels = {"port": "same", "mode": "tproxy", "method": "GET", "code": "200"}
    assert first.get_sample_value("tproxy_requests_total", labels) == 1
    assert second.get_sample_value("tproxy_requests_total", labels) is None
    incomplete = {"port": "same", "reason": "client"}
    assert first.get_sample_value("tproxy_responses_incomplete_total", incomplete) == 1
