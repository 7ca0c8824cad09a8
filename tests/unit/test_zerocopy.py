"""
SplicePump with real loopback TCP connections on a real (uninstalled) worker
reactor, driven one iteration at a time: bytes, half-close, backpressure,
resets, Twisted's buffered bytes, abort, pipes, the copying fallback.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.zerocopy import ABORTED, DONE, RESET, PipePool, SplicePump, can_splice


class Accepted(Protocol):
    def connectionMade(self):
        self.factory.accepted.append(self)
        self.lost = None
        self.received = b""

    def dataReceived(self, data):
        self.received += data  # only before a pump takes the connection over

    def connectionLost(self, reason):
        self.lost = reason


class Lab:
    """A reactor, a listener, and pairs of (accepted transport, test-side socket)."""

    def __init__(self) -> None:
        self.reactor = WorkerReactor()
        self.factory = Factory.forProtocol(Accepted)
        self.factory.accepted = []
        self.listener = self.reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        # Accepted sockets inherit this: buffers small enough that 32 MB cannot
        # hide in them (the receive buffer may grow to tcp_rmem's maximum).
        self.listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        self.peers: list[socket.socket] = []

    def run_until(self, done, what: str, timeout: float = 20.0) -> None:
        give_up = time.monotonic() + timeout
        while not done():
            if time.monotonic() > give_up:
                raise AssertionError(f"never happened: {what}")
            self.reactor.iterate(0.01)

    def connection(self, rcvbuf: int | None = None):
        peer = socket.socket()
        if rcvbuf is not None:  # before connecting, so that the window is scaled to it
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        peer.connect(("127.0.0.1", self.listener.getHost().port))
        peer.setblocking(False)
        self.peers.append(peer)
        count = len(self.factory.accepted)
        self.run_until(lambda: len(self.factory.accepted) > count, "accepted")
        return self.factory.accepted[-1], peer

    def pump(self, *, pool=None, copy=False, rcvbuf=None):
        (a, pa), (b, pb) = self.connection(), self.connection(rcvbuf)
        ends: list[str] = []
        eofs: list[object] = []
        pump = SplicePump(
            a.transport,
            b.transport,
            reactor=self.reactor,
            clock=self.reactor,
            on_end=ends.append,
            on_eof=eofs.append,
            pool=pool or PipePool(),
            copy=copy,
        )
        return pump, (a, pa), (b, pb), ends, eofs

    def send_all(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                self.reactor.iterate(0.001)

    def read(self, sock: socket.socket, n: int) -> bytes:
        got = bytearray()

        def more() -> bool:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                return False
            if not chunk:
                raise AssertionError(f"EOF after {len(got)} of {n} bytes")
            got.extend(chunk)
            return len(got) >= n

        self.run_until(lambda: len(got) >= n or more(), f"{n} bytes")
        return bytes(got)

    def eof_seen(self, sock: socket.socket) -> bool:
        try:
            return sock.recv(1 << 16) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.peers.clear()
        self.listener.stopListening()
        for _ in range(5):
            self.reactor.iterate(0)


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


def test_bytes_flow_both_ways_and_are_counted(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    pump.start()
    up, down = os.urandom(3_000_000), os.urandom(200_000)
    lab.send_all(pa, up)
    assert lab.read(pb, len(up)) == up
    lab.send_all(pb, down)
    assert lab.read(pa, len(down)) == down
    assert (pump.a_to_b, pump.b_to_a) == (len(up), len(down))
    assert ends == [] and a.lost is None and b.lost is None
    # While spliced, Twisted delivers nothing to the protocols.
    assert a.received == b.received == b""
    pump.abort()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=70_000)), max_size=8),
    copy=st.booleans(),
)
def test_any_interleaving_of_writes_arrives_intact_and_in_order(lab, chunks, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
    pump.start()
    sent = {True: b"", False: b""}
    for forward, data in chunks:
        lab.send_all(pa if forward else pb, data)
        sent[forward] += data
    got_b = lab.read(pb, len(sent[True])) if sent[True] else b""
    got_a = lab.read(pa, len(sent[False])) if sent[False] else b""
    assert (got_b, got_a) == (sent[True], sent[False])
    assert (pump.a_to_b, pump.b_to_a) == (len(sent[True]), len(sent[False]))
    pump.abort()
    assert ends == [ABORTED]


def test_a_half_close_is_passed_on_and_the_other_direction_keeps_flowing(lab):
    pump, (a, pa), (b, pb), ends, eofs = lab.pump()
    pump.start()
    lab.send_all(pa, b"request")
    pa.shutdown(socket.SHUT_WR)
    assert lab.read(pb, 7) == b"request"
    lab.run_until(lambda: lab.eof_seen(pb), "EOF passed on to b")
    assert eofs == [a.transport] and ends == []
    answer = os.urandom(500_000)
    lab.send_all(pb, answer)
    assert lab.read(pa, len(answer)) == answer
    pb.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: bool(ends), "the pump ends")
    assert ends == [DONE] and eofs == [a.transport, b.transport]
    lab.run_until(lambda: a.lost is not None and b.lost is not None, "both closed")
    assert lab.eof_seen(pa)


def test_a_full_destination_stops_reading_the_source_until_it_drains(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(rcvbuf=1 << 16)
    pump.start()
    data = os.urandom(32_000_000)
    view = memoryview(data)
    # pb reads nothing: a's sender must end up blocked, the pump holding at
    # most its pipe's worth, not the rest of the 32 MB.
    stalled = 0
    while view and stalled < 50:
        try:
            view = view[pa.send(view) :]
            stalled = 0
        except BlockingIOError:
            stalled += 1
        lab.reactor.iterate(0.001)
    assert view, "the whole transfer fitted in the buffers: no backpressure was needed"
    assert pump.held <= 2 << 20
    assert pump.a_to_b < len(data)
    rest = bytes(view)
    got = bytearray()
    while len(got) < len(data):
        if rest:
            try:
                rest = rest[pa.send(rest) :]
            except BlockingIOError:
                pass
        try:
            got.extend(pb.recv(1 << 20))
        except BlockingIOError:
            lab.reactor.iterate(0.001)
    assert bytes(got) == data
    assert ends == []
    pump.abort()


def test_a_reset_on_one_side_closes_both_and_tells_the_owner_once(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    pump.start()
    lab.send_all(pa, b"x" * 1000)
    assert lab.read(pb, 1000) == b"x" * 1000
    pb.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pb.close()
    lab.peers.remove(pb)
    lab.send_all(pa, b"more")  # the write towards the reset side fails, or its read does
    lab.run_until(lambda: bool(ends), "the pump notices the reset")
    lab.run_until(lambda: a.lost is not None and b.lost is not None, "both closed")
    assert ends == [RESET]
    with pytest.raises(ConnectionResetError):
        lab.run_until(lambda: lab.eof_seen(pa), "a reset")
    pump.abort()  # after the end: nothing more happens
    assert ends == [RESET]


def test_bytes_twisted_still_buffered_are_delivered_before_spliced_ones(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    a.transport.write(b"hello from twisted, ")
    b.transport.write(b"replayed hello, ")
    pump.start()
    lab.send_all(pb, b"then spliced")
    lab.send_all(pa, b"then spliced too")
    assert lab.read(pa, 32) == b"hello from twisted, then spliced"
    assert lab.read(pb, 32) == b"replayed hello, then spliced too"
    pump.abort()


def test_abort_resets_both_connections_and_the_protocols_see_it(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    pump.start()
    pump.abort()
    pump.abort()
    assert ends == [ABORTED]
    lab.run_until(lambda: a.lost is not None and b.lost is not None, "both closed")
    for peer in (pa, pb):
        with pytest.raises(ConnectionResetError):
            lab.run_until(lambda p=peer: lab.eof_seen(p), "a reset")


def test_an_idle_pump_holds_no_pipe_and_the_pool_reuses_them(lab):
    pool = PipePool(keep=4)
    pump, (a, pa), (b, pb), ends, _ = lab.pump(pool=pool)
    pump.start()
    for _ in range(20):
        lab.send_all(pa, b"ping")
        assert lab.read(pb, 4) == b"ping"
    assert pool.in_use == 0
    assert 1 <= len(pool._idle) <= 4
    pump.abort()
    pool.close()
    assert pool._idle == []


def test_the_last_activity_time_moves_only_with_bytes(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    pump.start()
    started = pump.last_activity
    lab.reactor.iterate(0.02)
    assert pump.last_activity == started
    lab.send_all(pa, b"tick")
    lab.read(pb, 4)
    assert pump.last_activity > started
    pump.abort()


def test_only_plain_open_tcp_transports_can_be_spliced(lab):
    assert not can_splice(StringTransport())
    a, _ = lab.connection()
    assert can_splice(a.transport)
    a.transport.loseWriteConnection()
    assert not can_splice(a.transport)
    b, _ = lab.connection()
    b.transport.loseConnection()
    assert not can_splice(b.transport)
