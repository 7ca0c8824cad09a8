"""
The TLS layer on fake transports and a fake clock: what it decides, where it
connects and from which address, what it replays, relays and answers.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import os

import pytest
from prometheus_client import REGISTRY
from twisted.internet import error as neterror
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.metrics import NullPortMetrics, PortMetrics, TLSPortMetrics
from tproxy_twist.testing import (
    FakeConnect,
    FakeTransport,
    alpn_extension,
    extension,
    hello_message,
    records,
    sni_extension,
    tcp_address,
)
from tproxy_twist.tls.layer import CLOSED, CONNECTING, HELLO, RELAYING, TLSFactory

CLIENT = ("198.51.100.2", 40001)
ORIGIN = ("203.0.113.2", 443)
ROUTER_ADDRESSES = frozenset({"198.51.100.1", "203.0.113.1"})
ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"
DECODE_ERROR = b"\x15\x03\x03\x00\x02\x02\x32"
_names = itertools.count()

HELLO_BYTES = records(
    hello_message(
        [sni_extension(b"www.example.org"), alpn_extension([b"h2", b"http/1.1"]),
         extension(43, b"\x04\x03\x04\x03\x03")]
    )
)  # fmt: skip
NO_SNI_HELLO = records(hello_message([alpn_extension([b"http/1.1"])]))


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Harness:
    """One client connection to a TLS port, with a fake upstream and clock."""

    def __init__(
        self,
        extra: str = "",
        *,
        mode: str = "tproxy",
        destination: tuple[str, int] = ORIGIN,
        client: tuple[str, int] = CLIENT,
        top: str = "",
        tls_metrics=None,
        metrics=None,
    ) -> None:
        self.name = f"tls{next(_names)}"
        text = (
            f'{top}[[port]]\nname = "{self.name}"\nlisten = "[::]:3130"\nmode = "{mode}"\n'
            f'protocol = "tls"\n{extra}'
        )
        config = C.loads(text)
        self.port = config.ports[0]
        self.clock = Clock()
        self.connect = FakeConnect()
        self.metrics = metrics or PortMetrics(self.name, mode)
        self.factory = TLSFactory(
            self.port,
            timeouts=config.timeouts,
            connect=self.connect,
            clock=self.clock,
            local_addresses=ROUTER_ADDRESSES,
            metrics=self.metrics,
            tls_metrics=tls_metrics or TLSPortMetrics(self.name),
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

    def actions(self, action: str) -> float:
        self.factory.tls_metrics.flush()
        return sample("tproxy_tls_connections_total", port=self.name, action=action)

    def rejected(self, reason: str) -> float:
        self.factory.tls_metrics.flush()
        return sample("tproxy_tls_rejected_total", port=self.name, reason=reason)

    def lose(self) -> None:
        self.transport.disconnected = True
        self.protocol.connectionLost(neterror.ConnectionDone())

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass, in sweep-sized steps."""
        steps = int(seconds / 0.25) + 1
        for _ in range(steps):
            self.clock.advance(0.25)


# --- splice -------------------------------------------------------------------------------


def test_a_hello_is_spliced_to_the_original_destination_from_the_clients_address():
    h = Harness()
    h.send(HELLO_BYTES[:7])
    assert h.connect.attempts == []
    h.send(HELLO_BYTES[7:])
    attempt = h.connect.last
    assert (attempt.host, attempt.port, attempt.source_ip) == ("203.0.113.2", 443, "198.51.100.2")
    assert h.protocol.state == CONNECTING
    upstream = attempt.succeed()
    assert upstream.take() == HELLO_BYTES  # replayed unchanged
    assert h.protocol.state == RELAYING
    assert h.transport.producerState == "producing"
    assert h.actions("splice") == 1


def test_the_sni_never_chooses_where_to_connect():
    h = Harness(destination=("2001:db8:2::2", 443), client=("2001:db8:1::2", 5000))
    h.send(HELLO_BYTES)
    assert (h.connect.last.host, h.connect.last.source_ip) == ("2001:db8:2::2", "2001:db8:1::2")


def test_ipv4_mapped_clients_are_spoofed_as_ipv4():
    h = Harness(destination=("::ffff:203.0.113.2", 443), client=("::ffff:198.51.100.2", 5000))
    h.send(HELLO_BYTES)
    assert (h.connect.last.host, h.connect.last.source_ip) == ("203.0.113.2", "198.51.100.2")


def test_without_spoofing_the_upstream_connection_uses_the_routers_address():
    h = Harness("spoof_client_ip = false\n")
    h.send(HELLO_BYTES)
    assert h.connect.last.source_ip is None


def test_spliced_bytes_flow_both_ways_with_backpressure_registered():
    h = Harness()
    h.send(HELLO_BYTES)
    upstream = h.connect.last.succeed()
    upstream.take()
    h.send(b"client finished")
    assert upstream.take() == b"client finished"
    h.connect.last.protocol.dataReceived(b"server flight")
    assert h.received() == b"server flight"
    assert h.transport.producer is upstream and h.transport.streaming
    assert upstream.producer is h.transport


def test_a_client_sending_much_while_connecting_is_paused_until_connected():
    h = Harness()
    h.send(HELLO_BYTES)
    assert h.transport.producerState == "producing"
    h.send(b"x" * 70000)
    assert h.transport.producerState == "paused"
    upstream = h.connect.last.succeed()
    assert upstream.take() == HELLO_BYTES + b"x" * 70000
    assert h.transport.producerState == "producing"


def test_bytes_sent_while_connecting_follow_the_hello():
    h = Harness()
    h.send(HELLO_BYTES)
    h.send(b"\x14\x03\x03\x00\x01\x01")  # a read that was already under way
    upstream = h.connect.last.succeed()
    assert upstream.take() == HELLO_BYTES + b"\x14\x03\x03\x00\x01\x01"


def test_client_eof_half_closes_upstream_and_the_answer_still_arrives():
    h = Harness()
    h.send(HELLO_BYTES)
    upstream = h.connect.last.succeed()
    h.protocol.readConnectionLost()
    assert upstream.write_closed and not h.transport.closed
    h.connect.last.protocol.dataReceived(b"late answer")
    assert h.received() == b"late answer"
    h.connect.last.protocol.readConnectionLost()
    assert h.transport.closed and upstream.closed


def test_upstream_eof_half_closes_the_client():
    h = Harness()
    h.send(HELLO_BYTES)
    upstream = h.connect.last.succeed()
    h.connect.last.protocol.readConnectionLost()
    assert h.transport.write_closed and not h.transport.closed
    h.send(b"more from the client")
    assert upstream.take().endswith(b"more from the client")


def test_a_client_eof_while_connecting_is_passed_on_after_the_replay():
    h = Harness()
    h.send(HELLO_BYTES)
    h.protocol.readConnectionLost()
    upstream = h.connect.last.succeed()
    assert upstream.take() == HELLO_BYTES and upstream.write_closed


def test_upstream_closing_closes_the_client_after_what_it_sent():
    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    h.connect.last.protocol.dataReceived(b"bye")
    h.connect.last.close()
    assert h.received() == b"bye" and h.transport.disconnecting


def test_the_client_leaving_aborts_the_upstream_connection():
    h = Harness()
    h.send(HELLO_BYTES)
    upstream = h.connect.last.succeed()
    h.lose()
    assert upstream.disconnecting or upstream.disconnected
    assert h.factory.connections == set()


def test_a_client_that_left_while_connecting_gets_no_upstream_connection():
    h = Harness()
    h.send(HELLO_BYTES)
    h.lose()
    assert h.connect.last.stopped  # the attempt is called off
    upstream = h.connect.last.succeed()  # ... or, had it connected meanwhile, closed
    assert upstream.take() == b"" and upstream.closed


def test_an_origin_that_never_answers_is_given_up_at_the_connect_timeout():
    h = Harness(top="[timeouts]\nconnect = 5\n")
    h.send(HELLO_BYTES)
    attempt = h.connect.last
    assert attempt.timeout is None  # the connection's deadline, no timer per attempt
    before = sample("tproxy_upstream_errors_total", port=h.name, reason="timeout")
    h.advance(4.5)
    assert not attempt.stopped and not h.transport.disconnecting
    h.advance(1)
    assert attempt.stopped and h.transport.disconnecting
    assert sample("tproxy_upstream_errors_total", port=h.name, reason="timeout") == before + 1
    h.lose()
    assert h.entries[-1].status == 504


def test_a_refused_upstream_resets_the_client_and_is_counted():
    h = Harness()
    h.send(HELLO_BYTES)
    before = sample("tproxy_upstream_errors_total", port=h.name, reason="refused")
    h.connect.last.fail(neterror.ConnectionRefusedError())
    assert h.transport.disconnecting
    assert sample("tproxy_upstream_errors_total", port=h.name, reason="refused") == before + 1
    h.lose()
    assert h.entries[-1].status == 502 and h.entries[-1].result == "NONE"


def test_a_spoofing_failure_is_counted_as_spoof():
    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.fail(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    failure = neterror.ConnectBindError(99, "Cannot assign requested address")
    h2 = Harness()
    h2.send(HELLO_BYTES)
    h2.connect.last.fail(failure)
    assert sample("tproxy_upstream_errors_total", port=h2.name, reason="spoof") == 1


def test_an_idle_splice_is_closed_after_the_idle_timeout():
    h = Harness(top="[timeouts]\nidle = 10\n")
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    h.advance(6)
    h.send(b"x")
    h.advance(6)
    assert not h.transport.closed  # activity moved the deadline
    h.advance(5)
    assert h.transport.closed


def test_a_spliced_connection_is_logged_like_squids_connect_with_the_hello_fields():
    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    h.connect.last.protocol.dataReceived(b"12345")
    h.lose()
    (entry,) = h.entries
    assert (entry.method, entry.url, entry.result, entry.status) == (
        "CONNECT", "www.example.org:443", "TCP_TUNNEL", 200,
    )  # fmt: skip
    assert entry.destination == "203.0.113.2:443"
    assert (entry.bytes_in, entry.bytes_out) == (len(HELLO_BYTES), 5)
    assert (entry.sni, entry.alpn, entry.tls_version, entry.ech) == (
        "www.example.org", "h2,http/1.1", "TLSv1.3", False,
    )  # fmt: skip


def test_spliced_bytes_reach_the_port_metrics_while_the_connection_lasts():
    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    h.connect.last.protocol.dataReceived(b"x" * 1000)
    h.advance(0.5)
    assert sample("tproxy_bytes_total", port=h.name, direction="out") == 1000
    assert sample("tproxy_bytes_total", port=h.name, direction="in") == len(HELLO_BYTES)


# --- deny -----------------------------------------------------------------------------------


def test_a_denied_sni_gets_access_denied_and_no_upstream_connection():
    h = Harness('[port.tls]\n[[port.tls.rule]]\naction = "deny"\nsni = [".example.org"]\n')
    h.send(HELLO_BYTES)
    assert h.received() == ACCESS_DENIED
    assert h.transport.write_closed
    assert h.connect.attempts == []
    assert h.actions("deny") == 1 and h.rejected("denied") == 1
    h.lose()
    assert (h.entries[0].result, h.entries[0].status) == ("TCP_DENIED", 403)


def test_a_flood_of_denied_connections_logs_one_line_per_interval():
    from twisted.logger import globalLogPublisher

    h = Harness('allow = ["192.0.2.0/24"]\n')  # the client is outside: forbidden
    h.lose()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(50):
            connection = h.factory.buildProtocol(None)
            transport = FakeTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
            connection.makeConnection(transport)
            connection.dataReceived(HELLO_BYTES)
            assert transport.take() == ACCESS_DENIED  # each one still denied
            transport.disconnected = True
            connection.connectionLost(neterror.ConnectionDone())
        h.clock.advance(11)
        connection = h.factory.buildProtocol(None)
        connection.makeConnection(
            FakeTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
        )
        connection.dataReceived(HELLO_BYTES)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_format", "").startswith("denying")]
    assert len(lines) == 2
    assert lines[1]["suppressed"] == 49
    assert sample("tproxy_rejected_total", port=h.name, reason="forbidden") == 51


def test_a_denied_client_that_does_not_close_is_aborted_after_lingering():
    h = Harness('[port.tls]\ndefault = "deny"\n')
    h.send(HELLO_BYTES)
    h.advance(3)
    assert h.transport.disconnected or h.transport.disconnecting


def test_a_hello_without_sni_gets_the_no_sni_action():
    h = Harness('[port.tls]\nno_sni = "deny"\n')
    h.send(NO_SNI_HELLO)
    assert h.received() == ACCESS_DENIED
    assert h.rejected("no_sni") == 1 and h.rejected("denied") == 0
    h2 = Harness('[port.tls]\nno_sni = "splice"\n')
    h2.send(NO_SNI_HELLO)
    assert h2.connect.last.host == "203.0.113.2"
    h2.connect.last.succeed()
    h2.lose()
    assert h2.entries[0].url == "203.0.113.2:443"  # no SNI: the destination address


def test_clients_outside_allow_are_denied_whatever_the_rules_say():
    h = Harness('allow = ["192.0.2.0/24"]\n')
    h.send(HELLO_BYTES)
    assert h.received() == ACCESS_DENIED and h.connect.attempts == []
    assert sample("tproxy_rejected_total", port=h.name, reason="forbidden") == 1


def test_a_direct_connection_to_the_tls_port_is_refused_as_a_loop():
    h = Harness(destination=("203.0.113.1", 3130))
    h.send(HELLO_BYTES)
    assert h.received() == ACCESS_DENIED and h.connect.attempts == []
    assert sample("tproxy_rejected_total", port=h.name, reason="loop") == 1


@pytest.mark.parametrize(
    "rules",
    ['deny_destinations = ["203.0.113.0/24:443"]\n', 'allow_destinations = ["*:80"]\n'],
)
def test_a_destination_the_port_rules_refuse_gets_access_denied_and_no_upstream(rules):
    h = Harness(rules + '[port.tls]\ndefault = "splice"\n')
    h.send(HELLO_BYTES)
    assert h.received() == ACCESS_DENIED and h.connect.attempts == []
    assert sample("tproxy_rejected_total", port=h.name, reason="destination") == 1
    assert h.actions("deny") == 1
    h.lose()
    entry = h.entries[0]
    assert (entry.result, entry.status, entry.url) == ("TCP_DENIED", 403, "www.example.org:443")


def test_a_destination_the_port_rules_allow_is_spliced():
    h = Harness('deny_destinations = ["203.0.113.0/24:25"]\nallow_destinations = ["*:443"]\n')
    h.send(HELLO_BYTES)
    assert h.connect.last.host == "203.0.113.2"
    assert sample("tproxy_rejected_total", port=h.name, reason="destination") == 0


def test_a_refused_destination_is_not_tunnelled_for_a_client_that_is_not_tls():
    h = Harness('on_not_tls = "tunnel"\ndeny_destinations = ["*:443"]\n')
    h.send(b"GET / HTTP/1.1\r\n")
    assert h.connect.attempts == [] and h.transport.write_closed
    assert sample("tproxy_rejected_total", port=h.name, reason="destination") == 1
    assert h.actions("tunnel") == 0 and h.actions("deny") == 1


def test_a_client_outside_allow_is_not_tunnelled_either():
    h = Harness('on_not_tls = "tunnel"\nallow = ["192.0.2.0/24"]\n')
    h.send(b"GET / HTTP/1.1\r\n")
    assert h.connect.attempts == [] and h.transport.write_closed
    assert sample("tproxy_rejected_total", port=h.name, reason="forbidden") == 1


# --- not TLS, bad hellos, silence -------------------------------------------------------------


def test_plain_http_on_a_tls_port_is_closed_by_default():
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.received() == b"" and h.transport.write_closed
    assert h.connect.attempts == [] and h.rejected("not_tls") == 1


def test_plain_http_is_tunnelled_to_the_destination_when_configured():
    h = Harness('on_not_tls = "tunnel"\n')
    h.send(b"GET / HTTP/1.1\r\n")
    upstream = h.connect.last.succeed()
    h.send(b"Host: x\r\n\r\n")
    assert upstream.take() == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert h.actions("tunnel") == 1 and h.rejected("not_tls") == 0
    h.lose()
    assert (h.entries[0].result, h.entries[0].url, h.entries[0].sni) == (
        "TCP_TUNNEL", "203.0.113.2:443", None,
    )  # fmt: skip


def test_a_malformed_hello_gets_decode_error_and_is_counted():
    h = Harness()
    h.send(records(hello_message([sni_extension(b"bad name")])))
    assert h.received() == DECODE_ERROR and h.rejected("malformed") == 1


def test_a_hello_beyond_the_size_cap_is_refused():
    h = Harness()
    h.send(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00")
    assert h.received() == DECODE_ERROR and h.rejected("too_large") == 1


def test_a_silent_client_is_closed_when_client_hello_timeout_runs_out():
    h = Harness("client_hello_timeout = 2\n")
    h.advance(1.5)
    assert not h.transport.closed
    h.advance(1)
    assert h.transport.closed
    assert h.rejected("timeout") == 1 and h.actions("close") == 1


def test_a_trickled_hello_is_timed_from_the_connection_not_from_the_last_byte():
    h = Harness("client_hello_timeout = 2\n")
    for byte in HELLO_BYTES[:20]:
        h.send(bytes([byte]))
        h.advance(0.25)
    assert h.transport.closed and h.rejected("timeout") == 1


def test_a_client_leaving_before_its_hello_counts_as_closed():
    h = Harness()
    h.send(HELLO_BYTES[:10])
    h.lose()
    assert h.actions("close") == 1 and h.protocol.state == CLOSED


def test_connections_are_counted_per_port_and_handed_to_the_metrics_at_the_next_sweep():
    h = Harness()
    assert sample("tproxy_connections_total", port=h.name) == 0
    h.clock.advance(0.25)  # a sweep
    assert sample("tproxy_connections_total", port=h.name) == 1
    assert sample("tproxy_connections_active", port=h.name) == 1
    assert h.protocol.state == HELLO
    h.lose()
    h.clock.advance(0.25)
    assert sample("tproxy_connections_active", port=h.name) == 0
    assert sample("tproxy_connections_total", port=h.name) == 1


def test_counts_not_swept_yet_reach_the_metrics_when_the_port_shuts_down():
    h = Harness()
    h.lose()
    h.factory.shutdown()
    assert sample("tproxy_connections_total", port=h.name) == 1
    assert sample("tproxy_connections_active", port=h.name) == 0


def test_drain_keeps_spliced_connections_and_abort_all_ends_them():
    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    assert h.factory.drain() == 1 and not h.transport.closed
    h.factory.abort_all()
    assert h.transport.closed


# --- any order of events (hypothesis.stateful) -------------------------------------------------

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

ACTIONS = ("splice", "deny", "tunnel", "close")


class CountingTLSMetrics:
    def __init__(self) -> None:
        self.actions: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()

    def action(self, action: str) -> None:
        assert action in ACTIONS
        self.actions[action] += 1

    def rejected(self, reason: str) -> None:
        self.reasons[reason] += 1

    def flush(self) -> None:
        pass


class TLSConnectionMachine(RuleBasedStateMachine):
    """
    Whatever the client, the upstream and the clock do, in any order: the
    upstream only ever gets a prefix of what the client sent, the client a
    prefix of what the upstream sent (or one alert), there is at most one
    upstream connection, one action per connection and one log entry.
    """

    @initialize(
        config=st.sampled_from(
            ["", '[port.tls]\ndefault = "deny"\n', 'on_not_tls = "tunnel"\n',
             'client_hello_timeout = 1\n[port.tls]\nno_sni = "deny"\n']
        ),
        hello=st.sampled_from([HELLO_BYTES, NO_SNI_HELLO, b"GET / HTTP/1.1\r\n\r\n",
                               b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"]),
    )  # fmt: skip
    def start(self, config, hello):
        # Plain counters: a registry lookup per check would make this quadratic.
        self.tls_metrics = CountingTLSMetrics()
        self.h = Harness(config, tls_metrics=self.tls_metrics,
                         metrics=NullPortMetrics("machine", "tproxy"))  # fmt: skip
        self.hello = hello
        self.sent = 0  # bytes of the hello sent
        self.client_bytes = b""
        self.upstream_bytes = b""
        self.upstream_got = b""
        self.client_got = b""
        self.client_eof = self.upstream_eof = self.lost = False

    def _attempt(self):
        return self.h.connect.attempts[0] if self.h.connect.attempts else None

    def _upstream_open(self) -> bool:
        attempt = self._attempt()
        return (
            attempt is not None and attempt.transport is not None and not attempt.transport.closed
        )

    @precondition(lambda self: not self.lost and not self.client_eof)
    @rule(size=st.integers(1, 200), extra=st.binary(max_size=20))
    def client_sends(self, size, extra):
        if self.sent < len(self.hello):
            data = self.hello[self.sent : self.sent + size]
            self.sent += len(data)
        else:
            data = extra
        self.client_bytes += data
        self.h.send(data)

    @precondition(lambda self: not self.lost and not self.client_eof)
    @rule()
    def client_eof_(self):
        self.client_eof = True
        self.h.protocol.readConnectionLost()

    @precondition(lambda self: not self.lost)
    @rule()
    def client_lost(self):
        self.lost = True
        self.h.lose()

    @rule()
    def upstream_connects(self):
        attempt = self._attempt()
        if attempt is not None and attempt.protocol is None and attempt.transport is None:
            attempt.succeed()

    @rule()
    def upstream_fails(self):
        attempt = self._attempt()
        if attempt is not None and attempt.protocol is None:
            attempt.protocol = "failed"
            attempt.fail(neterror.ConnectionRefusedError())

    @precondition(lambda self: not self.upstream_eof)
    @rule(data=st.binary(min_size=1, max_size=20))
    def upstream_sends(self, data):
        if self._upstream_open() and self.h.protocol.state != CLOSED:
            self.upstream_bytes += data
            self._attempt().protocol.dataReceived(data)

    @precondition(lambda self: not self.upstream_eof)
    @rule()
    def upstream_eof_(self):
        if self._upstream_open():
            self.upstream_eof = True
            self._attempt().protocol.readConnectionLost()

    @rule()
    def upstream_closes(self):
        if self._upstream_open():
            self._attempt().close()

    @rule(seconds=st.sampled_from([0.25, 1.0, 3.0]))
    def time_passes(self, seconds):
        self.h.advance(seconds)

    @invariant()
    def relayed_bytes_are_prefixes(self):
        attempt = self._attempt()
        if attempt is not None and attempt.transport is not None:
            self.upstream_got += attempt.transport.take()
            assert self.client_bytes.startswith(self.upstream_got)
        self.client_got += self.h.received()
        if self.client_got in (ACCESS_DENIED, DECODE_ERROR):
            assert attempt is None or attempt.transport is None
        else:
            assert self.upstream_bytes.startswith(self.client_got)

    @invariant()
    def at_most_one_upstream_connection(self):
        assert len(self.h.connect.attempts) <= 1

    @invariant()
    def one_action_and_one_log_entry_per_connection(self):
        actions = sum(self.tls_metrics.actions.values())
        assert actions <= 1
        if self.h.protocol.state == CLOSED:
            assert actions == 1
            assert len(self.h.entries) == 1
            assert self.h.factory.connections == set()
        else:
            assert self.h.entries == []

    @invariant()
    def reading_is_not_left_paused_once_relaying(self):
        if self.h.protocol.state == RELAYING and not self.client_eof:
            assert self.h.transport.producerState == "producing"


TLSConnectionMachine.TestCase.settings = settings(
    max_examples=60 * int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1")),
    stateful_step_count=25,
    deadline=None,
)
test_tls_connection_in_any_order_of_events = TLSConnectionMachine.TestCase


def test_a_client_that_half_closes_before_its_hello_is_closed_and_counted_once():
    h = Harness("client_hello_timeout = 1\n")
    h.send(HELLO_BYTES[:10])
    h.protocol.readConnectionLost()
    assert h.transport.closed
    h.advance(2)  # the hello deadline must not count it a second time
    assert h.actions("close") == 1 and h.rejected("timeout") == 0


def test_log_lines_of_a_spliced_connection_in_both_formats():
    from tproxy_twist.accesslog import JSONFormatter, SquidFormatter

    h = Harness()
    h.send(HELLO_BYTES)
    h.connect.last.succeed()
    h.lose()
    (entry,) = h.entries
    squid = SquidFormatter()(entry).split()
    assert squid[3:8] == ["TCP_TUNNEL/200", "0", "CONNECT", "www.example.org:443", "-"]
    assert squid[8] == "HIER_DIRECT/203.0.113.2"
    line = json.loads(JSONFormatter()(entry))
    assert {k: line[k] for k in ("sni", "alpn", "tls_version", "ech")} == {
        "sni": "www.example.org", "alpn": "h2,http/1.1", "tls_version": "TLSv1.3", "ech": False,
    }  # fmt: skip
