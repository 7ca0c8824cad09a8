"""
SplicePump with real loopback TCP connections on a real (uninstalled) worker
reactor, driven one iteration at a time: bytes, half-close, backpressure,
resets, Twisted's buffered bytes, abort, pipes, the copying fallback.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import struct
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from tproxy_twist import zerocopy
from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.testing import iterate_until
from tproxy_twist.zerocopy import (
    ABORTED,
    DONE,
    RESET,
    SHORT,
    SINK_FAILED,
    SOURCE_FAILED,
    PipePool,
    SplicePump,
    SpliceTransfer,
    can_splice,
    can_splice_body,
)


class Accepted(Protocol):
    def connectionMade(self):
        self.factory.accepted.append(self)
        self.lost = None
        self.lost_calls = 0
        self.received = b""

    def dataReceived(self, data):
        self.received += data  # only before a pump takes the connection over

    def connectionLost(self, reason):
        self.lost = reason
        self.lost_calls += 1


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
        iterate_until(self.reactor, done, what, timeout)

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

    def send_until_stalled(self, sock: socket.socket, data: bytes) -> memoryview:
        """Send until the peer's side takes nothing for 50 reactor turns; what is left."""
        view = memoryview(data)
        stalled = 0
        while view and stalled < 50:
            try:
                view = view[sock.send(view) :]
                stalled = 0
            except BlockingIOError:
                stalled += 1
            self.reactor.iterate(0.001)
        return view

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


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_bytes_flow_both_ways_and_are_counted(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
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


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_a_half_close_is_passed_on_and_the_other_direction_keeps_flowing(lab, copy):
    pump, (a, pa), (b, pb), ends, eofs = lab.pump(copy=copy)
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


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_a_full_destination_stops_reading_the_source_until_it_drains(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(rcvbuf=1 << 16, copy=copy)
    pump.start()
    data = os.urandom(32_000_000)
    # pb reads nothing: a's sender must end up blocked, the pump holding at
    # most its pipe's worth (copying: one read's, in user space), not the
    # rest of the 32 MB.
    view = lab.send_until_stalled(pa, data)
    assert view, "the whole transfer fitted in the buffers: no backpressure was needed"
    assert pump.held <= (zerocopy._COPY_CHUNK if copy else 2 << 20)
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


def test_a_copying_read_asks_for_at_most_one_copy_chunk_whatever_the_caller_wants():
    # What a copied stream holds in user space while its destination is full
    # is one read: bounded per direction, not a pipe's megabyte.
    asked = []

    class Source:
        class sock:
            @staticmethod
            def recv(n: int) -> bytes:
                asked.append(n)
                return b"x" * min(n, 10)

    d = zerocopy._Direction(Source, None, b"", True)
    assert SplicePump._copy_in(None, d, zerocopy.CHUNK) == 10
    assert asked == [zerocopy._COPY_CHUNK] < [zerocopy.CHUNK]
    assert d.pending == b"x" * 10 and d.drained  # less than asked: the source is empty


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_a_reset_on_one_side_closes_both_and_tells_the_owner_once(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
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
    # Which socket failed and why is kept on the pump (never a log line per connection).
    assert pump.failure is not None and pump.failure.startswith("fd ")
    with pytest.raises(ConnectionResetError):
        lab.run_until(lambda: lab.eof_seen(pa), "a reset")
    pump.abort()  # after the end: nothing more happens
    assert ends == [RESET]


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_after_a_reset_both_connections_are_aborted_along_with_the_owner_once(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
    pump.start()
    pb.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pb.close()
    lab.peers.remove(pb)
    lab.send_all(pa, b"towards the reset side")
    lab.run_until(lambda: bool(ends), "the pump notices the reset")
    # In the same reactor turn as the owner, no timer in between: both protocols
    # have heard of it, as an abort (the surviving client gets a reset too).
    assert ends == [RESET]
    assert a.lost is not None and a.lost.check(ConnectionAborted)
    assert b.lost is not None and b.lost.check(ConnectionAborted)
    for _ in range(3):
        lab.reactor.iterate(0.01)
    assert (a.lost_calls, b.lost_calls) == (1, 1)
    with pytest.raises(ConnectionResetError):
        lab.run_until(lambda: lab.eof_seen(pa), "a reset")


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_bytes_twisted_still_buffered_are_delivered_before_spliced_ones(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
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


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_the_last_activity_time_moves_only_with_bytes(lab, copy):
    pump, (a, pa), (b, pb), ends, _ = lab.pump(copy=copy)
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


def freed_once_let_go(make_and_end) -> bool:
    """
    With the cyclic GC off, run C{make_and_end} (which returns an ended pump
    or transfer) and drop it: whether reference counting alone freed it.
    """
    gc.collect()
    gc.disable()
    try:
        ref = weakref.ref(make_and_end())
        return ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["done", "reset", "abort"])
def test_an_ended_pump_is_freed_by_reference_counting(lab, how):
    # Its ends and directions point back at it while it runs; once it ended
    # they let go, so neither the pump nor its owner (its callbacks) wait for
    # the cyclic GC.
    def make_and_end():
        pump, (a, pa), (b, pb), ends, _ = lab.pump()
        pump.start()
        lab.send_all(pa, b"x" * 1000)
        assert lab.read(pb, 1000) == b"x" * 1000
        if how == "abort":
            pump.abort()
        elif how == "reset":
            pb.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            pb.close()
            lab.peers.remove(pb)
            lab.send_all(pa, b"more")
        else:
            pa.shutdown(socket.SHUT_WR)
            pb.shutdown(socket.SHUT_WR)
        lab.run_until(lambda: bool(ends), "the pump ends")
        lab.run_until(lambda: a.lost is not None and b.lost is not None, "both closed")
        assert pump.a_to_b >= 1000  # the byte counts stay readable
        return pump

    assert freed_once_let_go(make_and_end)


# --- SpliceTransfer: exactly N bytes one way, then both handed back ------------------


def transfer(lab: Lab, length: int, *, copy=False, rcvbuf=None, pool=None):
    """A transfer from a (the source) to b (the sink) and the test-side peers."""
    (a, pa), (b, pb) = lab.connection(), lab.connection(rcvbuf)
    ends: list[str] = []
    t = SpliceTransfer(
        a.transport,
        b.transport,
        length,
        reactor=lab.reactor,
        clock=lab.reactor,
        on_end=ends.append,
        pool=pool or PipePool(),
        copy=copy,
    )
    return t, (a, pa), (b, pb), ends


@pytest.mark.parametrize("how", ["done", "abort"])
def test_an_ended_transfer_is_freed_by_reference_counting(lab, how):
    def make_and_end():
        t, (a, pa), (b, pb), ends = transfer(lab, 100_000)
        t.start()
        if how == "abort":
            t.abort()
        else:
            lab.send_all(pa, b"y" * 100_000)
            lab.run_until(lambda: bool(ends), "the transfer ends")
            assert ends == [DONE]
            assert lab.read(pb, 100_000) == b"y" * 100_000
        return t

    assert freed_once_let_go(make_and_end)


@pytest.mark.parametrize("copy", [False, True], ids=["splice", "copy"])
def test_a_transfer_moves_exactly_its_length_and_leaves_what_follows_to_twisted(lab, copy):
    t, (a, pa), (b, pb), ends = transfer(lab, 3_000_000, copy=copy)
    t.start()
    body, after = os.urandom(3_000_000), b"the next response"
    lab.send_all(pa, body + after)
    assert lab.read(pb, len(body)) == body
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE] and t.moved == 3_000_000 and t.held == 0
    # Handed back unread and open: the bytes after the body are Twisted's again.
    assert a.lost is None and b.lost is None
    a.transport.startReading()
    lab.run_until(lambda: a.received == after, "the rest read through Twisted")
    # And the sink is Twisted's to write to again.
    b.transport.write(b"more")
    assert lab.read(pb, 4) == b"more"


def test_a_transfer_delivers_what_twisted_buffered_for_the_sink_first(lab):
    t, (a, pa), (b, pb), ends = transfer(lab, 10)
    b.transport.write(b"HTTP head, ")
    t.start()
    lab.send_all(pa, b"0123456789")
    assert lab.read(pb, 21) == b"HTTP head, 0123456789"
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE]


def test_a_source_ending_early_is_short_and_nothing_is_closed(lab):
    t, (a, pa), (b, pb), ends = transfer(lab, 1_000_000)
    t.start()
    lab.send_all(pa, b"x" * 1000)
    pa.shutdown(socket.SHUT_WR)
    assert lab.read(pb, 1000) == b"x" * 1000
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [SHORT] and t.moved == 1000
    for _ in range(5):
        lab.reactor.iterate(0.01)
    assert a.lost is None and b.lost is None  # the owner decides


def test_a_sink_that_resets_is_reported_as_the_sinks_failure_once(lab):
    t, (a, pa), (b, pb), ends = transfer(lab, 50_000_000)
    t.start()
    lab.send_all(pa, b"x" * 100_000)
    lab.read(pb, 100_000)
    pb.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pb.close()
    lab.peers.remove(pb)

    def more() -> bool:
        try:
            pa.send(b"y" * 65536)
        except BlockingIOError:
            pass
        return bool(ends)

    lab.run_until(more, "the transfer notices the reset")
    assert ends == [SINK_FAILED]
    assert t.failure.startswith("fd "), t.failure  # the sink's descriptor, the system's words
    t.abort()
    assert ends == [SINK_FAILED]


def test_a_source_that_resets_is_reported_as_the_sources_failure(lab):
    t, (a, pa), (b, pb), ends = transfer(lab, 1_000_000)
    t.start()
    pa.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pa.close()
    lab.peers.remove(pa)
    lab.run_until(lambda: bool(ends), "the transfer notices the reset")
    assert ends == [SOURCE_FAILED]


def test_a_full_sink_stops_the_transfer_reading_until_it_drains(lab):
    n = 32_000_000
    t, (a, pa), (b, pb), ends = transfer(lab, n, rcvbuf=1 << 16)
    t.start()
    data = os.urandom(n)
    view = lab.send_until_stalled(pa, data)
    assert view, "the whole body fitted in the buffers: no backpressure was needed"
    assert t.held <= 2 << 20 and t.moved < n
    rest, got = bytes(view), bytearray()
    while len(got) < n:
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
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE]


def test_abort_stops_a_transfer_silently_and_holds_no_pipe(lab):
    pool = PipePool(keep=4)
    t, (a, pa), (b, pb), ends = transfer(lab, 1_000_000, pool=pool)
    t.start()
    lab.send_all(pa, b"z" * 5000)
    lab.read(pb, 5000)
    t.abort()
    t.abort()
    assert ends == [] and t.ended == ABORTED and pool.in_use == 0
    assert a.lost is None and b.lost is None


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=70_000), min_size=1, max_size=6),
    extra=st.binary(max_size=1000),
    copy=st.booleans(),
)
def test_any_split_of_a_body_arrives_whole_and_nothing_beyond_it_is_taken(lab, pieces, extra, copy):
    body = b"".join(pieces)
    t, (a, pa), (b, pb), ends = transfer(lab, len(body), copy=copy)
    t.start()
    for piece in pieces[:-1]:
        lab.send_all(pa, piece)
    lab.send_all(pa, pieces[-1] + extra)
    assert lab.read(pb, len(body)) == body
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE] and t.moved == len(body)
    if extra:
        a.transport.startReading()
        lab.run_until(lambda: a.received == extra, "what follows left to Twisted")
    a.transport.abortConnection()
    b.transport.abortConnection()


def test_only_open_plain_tcp_transports_with_nothing_to_write_can_splice_a_body(lab):
    (a, _), (b, _) = lab.connection(), lab.connection()
    assert can_splice_body(a.transport, b.transport)
    assert not can_splice_body(StringTransport(), b.transport)
    assert not can_splice_body(a.transport, StringTransport())
    a.transport.registerProducer(b.transport, True)  # producers may stay
    assert can_splice_body(a.transport, b.transport)
    a.transport.unregisterProducer()
    b.transport.write(b"the sink's buffer is delivered first")
    assert can_splice_body(a.transport, b.transport)
    a.transport.write(b"x" * (8 << 20))  # the source's own writes are not the transfer's
    assert not can_splice_body(a.transport, b.transport)


def test_bytes_read_in_a_pumps_last_round_go_out_without_waiting_for_more(lab, monkeypatch):
    # After its rounds a pump gives other connections a turn; what its last
    # round read must still be delivered though the source says nothing more.
    monkeypatch.setattr(zerocopy, "_ROUNDS", 1)
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    pump.start()
    lab.send_all(pa, b"one burst, then silence")
    assert lab.read(pb, 23) == b"one burst, then silence"
    pump.abort()
    t, (a, pa), (b, pb), ends = transfer(lab, 23)
    t.start()
    lab.send_all(pa, b"one burst, then silence")
    assert lab.read(pb, 23) == b"one burst, then silence"
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE]


def test_a_kernel_refusing_splice_makes_the_transfer_copy_the_rest_exactly(lab, monkeypatch):
    real_splice = os.splice

    def refusing(src, dst, count, *args, **kwargs):
        # Reading a socket into a pipe is refused (EINVAL), as on a kernel or
        # socket type without splice support; delivering from a pipe still works.
        if src not in pipe_ends:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, *args, **kwargs)

    pool = PipePool()
    pipe_ends = set()
    take = pool.take

    def taking():
        pipe = take()
        pipe_ends.add(pipe[0])
        return pipe

    monkeypatch.setattr(pool, "take", taking)
    monkeypatch.setattr(zerocopy.os, "splice", refusing)
    t, (a, pa), (b, pb), ends = transfer(lab, 2_000_000, pool=pool)
    t.start()
    body = os.urandom(2_000_000)
    lab.send_all(pa, body + b"next")
    assert lab.read(pb, len(body)) == body
    lab.run_until(lambda: bool(ends), "the transfer ends")
    assert ends == [DONE] and t.moved == len(body)
    a.transport.startReading()
    lab.run_until(lambda: a.received == b"next", "the rest left to Twisted")


class CountingPoller:
    """The reactor's epoll object, counting its register/modify/unregister calls."""

    def __init__(self, poller):
        self._poller = poller
        self.calls = []

    def register(self, fd, events):
        self.calls.append(("register", fd))
        return self._poller.register(fd, events)

    def modify(self, fd, events):
        self.calls.append(("modify", fd))
        return self._poller.modify(fd, events)

    def unregister(self, fd):
        self.calls.append(("unregister", fd))
        return self._poller.unregister(fd)

    def __getattr__(self, name):
        return getattr(self._poller, name)


def test_a_pump_takes_over_the_registrations_of_reading_transports_without_epoll_calls(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    poller = lab.reactor._poller
    counting = lab.reactor._poller = CountingPoller(poller)
    try:
        pump.start()
        assert counting.calls == []
        lab.send_all(pa, b"ping")
        assert lab.read(pb, 4) == b"ping"
        lab.send_all(pb, b"pong")
        assert lab.read(pa, 4) == b"pong"
        assert a.received == b.received == b""  # the pump read them, not Twisted
    finally:
        lab.reactor._poller = poller
    pump.abort()
    assert ends == [ABORTED]


def test_a_transport_that_was_not_reading_is_registered_by_the_pump(lab):
    pump, (a, pa), (b, pb), ends, _ = lab.pump()
    a.transport.stopReading()  # paused by its owner, say
    pump.start()
    lab.send_all(pa, b"ping")
    assert lab.read(pb, 4) == b"ping"
    pump.abort()


def test_after_a_clean_end_both_connections_are_closed_at_once_the_owner_told_first(lab):
    (a, pa), (b, pb) = lab.connection(), lab.connection()
    seen = []

    def on_end(reason):
        seen.append((reason, a.lost, b.lost))

    pump = SplicePump(
        a.transport, b.transport, reactor=lab.reactor, clock=lab.reactor, on_end=on_end
    )
    pump.start()
    pa.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: lab.eof_seen(pb), "EOF passed on to b")
    pb.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: bool(seen), "the pump ends")
    # on_end came first; both connectionLost calls followed in the same call,
    # with ConnectionDone: no loop iteration later.
    assert seen == [(DONE, None, None)]
    assert a.lost.check(ConnectionDone) and b.lost.check(ConnectionDone)
    assert a.transport.disconnected and b.transport.disconnected
    assert lab.eof_seen(pa) and lab.eof_seen(pb)
    for _ in range(5):
        lab.reactor.iterate(0)
    assert (a.lost_calls, b.lost_calls) == (1, 1)


def test_a_transport_aborted_by_the_owner_at_the_end_is_closed_once_as_aborted(lab):
    (a, pa), (b, pb) = lab.connection(), lab.connection()

    def on_end(reason):
        a.transport.abortConnection()  # the owner gives up on it: an abort, not a clean close

    pump = SplicePump(
        a.transport, b.transport, reactor=lab.reactor, clock=lab.reactor, on_end=on_end
    )
    pump.start()
    pa.shutdown(socket.SHUT_WR)
    pb.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: a.lost is not None, "a closed")
    assert a.lost.check(ConnectionAborted) and b.lost.check(ConnectionDone)
    for _ in range(5):
        lab.reactor.iterate(0)
    assert (a.lost_calls, b.lost_calls) == (1, 1)


def test_with_no_pipe_to_be_had_the_bytes_are_copied_and_the_stream_goes_on(lab, monkeypatch):
    # Out of descriptors a pipe cannot be made: the pump copies through user space
    # (a stream was reset before) and tries a pipe again at the next read.
    from twisted.logger import LogLevel, globalLogPublisher

    from tproxy_twist import zerocopy

    pool = PipePool(keep=0)
    pump, (a, pa), (b, pb), ends, _ = lab.pump(pool=pool)
    pipe2 = os.pipe2
    failing = [True]

    def pipe2_while_short(flags):
        if failing[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        return pipe2(flags)

    monkeypatch.setattr(zerocopy.os, "pipe2", pipe2_while_short)
    monkeypatch.setattr(zerocopy, "_shortage_log", None)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        pump.start()
        request, answer = os.urandom(300_000), os.urandom(2_000_000)
        lab.send_all(pa, request)
        assert lab.read(pb, len(request)) == request
        lab.send_all(pb, answer)
        assert lab.read(pa, len(answer)) == answer
        assert pool.shortages > 2 and pool.in_use == 0 and ends == []
        failing[0] = False  # descriptors back: spliced again
        lab.send_all(pa, b"more")
        assert lab.read(pb, 4) == b"more"
        assert pool.in_use == 0 and ends == []
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and "splice" in warnings[0]["log_format"]
    pump.abort()


# --- a raw upstream socket that the pump connects (the lean splice) ------------------------


class Origin:
    """A plain listening socket for raw upstream connections, accepted by the test."""

    def __init__(self, backlog: int = 16) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept(self, lab: Lab) -> socket.socket:
        def more() -> bool:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return False
            conn.setblocking(False)
            self.accepted.append(conn)
            return True

        lab.run_until(more, "the upstream connection accepted")
        return self.accepted[-1]

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def origin():
    origin = Origin()
    yield origin
    origin.close()


def connecting_pump(lab: Lab, port: int, to_b: bytes = b"hello"):
    """A pump from a lab connection to a raw socket connecting to 127.0.0.1:port."""
    from tproxy_twist.sockets import open_upstream

    a, pa = lab.connection()
    raw = open_upstream("127.0.0.1", port, None)
    events: list[object] = []
    pump = SplicePump(
        a.transport,
        raw,
        reactor=lab.reactor,
        clock=lab.reactor,
        on_end=events.append,
        on_connected=lambda: events.append("connected"),
        to_b=to_b,
        pool=PipePool(),
    )
    return pump, (a, pa), raw, events


def test_a_raw_upstream_is_connected_sent_what_was_read_first_and_relayed(lab, origin):
    pump, (a, pa), raw, events = connecting_pump(lab, origin.port, b"the hello")
    pump.start()
    assert pump.connecting and events == []
    ob = origin.accept(lab)
    assert lab.read(ob, 9) == b"the hello"
    assert events == ["connected"] and not pump.connecting
    lab.send_all(pa, b"then this")
    assert lab.read(ob, 9) == b"then this"
    lab.send_all(ob, b"answer")
    assert lab.read(pa, 6) == b"answer"
    assert (pump.a_to_b, pump.b_to_a) == (9, 6)  # what was read before is the owner's count
    ob.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: lab.eof_seen(pa), "the upstream's EOF passed on")
    pa.shutdown(socket.SHUT_WR)
    lab.run_until(lambda: len(events) == 2, "the pump ends")
    assert events == ["connected", DONE]
    assert a.lost.check(ConnectionDone) and raw.fileno() == -1  # both closed
    assert lab.eof_seen(ob)


def test_what_the_client_sends_while_connecting_follows_what_was_read_first(lab, origin):
    pump, (a, pa), raw, events = connecting_pump(lab, origin.port, b"first")
    pump.start()
    lab.send_all(pa, b"second")  # before the connect's end is seen, or after: same order
    ob = origin.accept(lab)
    assert lab.read(ob, 11) == b"firstsecond"
    pump.abort()
    assert events == ["connected", ABORTED] and raw.fileno() == -1


def test_a_refused_connect_ends_the_pump_with_the_reason_and_resets_the_client(lab):
    from twisted.internet.error import ConnectionRefusedError

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    pump, (a, pa), raw, events = connecting_pump(lab, port)
    pump.start()
    lab.run_until(lambda: bool(events), "the connect fails")
    assert events == [zerocopy.CONNECT_FAILED]
    assert isinstance(pump.connect_failure, ConnectionRefusedError)
    assert a.lost.check(ConnectionAborted) and raw.fileno() == -1
    for _ in range(5):
        lab.reactor.iterate(0)
    assert a.lost_calls == 1


def stalled_origin() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: a new connect to it stays under way."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())  # fills the queue of one
    return listener, filler


def test_a_client_reset_while_connecting_calls_the_connect_off(lab):
    listener, filler = stalled_origin()
    try:
        pump, (a, pa), raw, events = connecting_pump(lab, listener.getsockname()[1])
        pump.start()
        for _ in range(3):
            lab.reactor.iterate(0.01)
        assert pump.connecting and events == []
        pa.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pa.close()  # a reset
        lab.peers.remove(pa)
        lab.run_until(lambda: bool(events), "the client's reset seen")
        assert events == [RESET] and pump.failure is not None
        assert a.lost.check(ConnectionAborted) and raw.fileno() == -1
    finally:
        filler.close()
        listener.close()


def test_a_client_eof_while_connecting_waits_for_the_connect_and_follows_the_bytes(lab, origin):
    listener, filler = stalled_origin()
    try:
        pump, (a, pa), raw, events = connecting_pump(lab, listener.getsockname()[1], b"hi")
        pump.start()
        pa.shutdown(socket.SHUT_WR)
        for _ in range(5):
            lab.reactor.iterate(0.01)
        assert pump.connecting and events == []  # the EOF waits: the attempt goes on
        listener.settimeout(10)
        listener.accept()[0].close()  # the queue has room: the SYN's next try gets through
        filler.close()
        ob, _ = listener.accept()
        ob.setblocking(False)
        origin.accepted.append(ob)
        assert lab.read(ob, 2) == b"hi"
        lab.run_until(lambda: lab.eof_seen(ob), "the client's EOF passed on")
        assert events == ["connected"]
        pump.abort()
    finally:
        listener.close()


def test_abort_while_connecting_closes_the_raw_socket_and_resets_the_client(lab):
    listener, filler = stalled_origin()
    try:
        pump, (a, pa), raw, events = connecting_pump(lab, listener.getsockname()[1])
        pump.start()
        pump.abort()
        assert events == [ABORTED] and raw.fileno() == -1
        assert a.lost.check(ConnectionAborted)
    finally:
        filler.close()
        listener.close()


def test_a_connecting_pump_costs_one_registration_and_one_change_until_relaying(lab, origin):
    pump, (a, pa), raw, events = connecting_pump(lab, origin.port)
    poller = lab.reactor._poller
    counting = lab.reactor._poller = CountingPoller(poller)
    try:
        pump.start()
        ob = origin.accept(lab)
        assert lab.read(ob, 5) == b"hello"
        lab.send_all(ob, b"answer")
        assert lab.read(pa, 6) == b"answer"
        # The raw socket: added for writing, then switched to reading; the client's
        # registration taken over from Twisted: no call.
        assert counting.calls == [("register", raw.fileno()), ("modify", raw.fileno())]
        counting.calls.clear()
        ob.shutdown(socket.SHUT_WR)
        lab.run_until(lambda: lab.eof_seen(pa), "EOF to the client")
        pa.shutdown(socket.SHUT_WR)
        lab.run_until(lambda: len(events) == 2, "the end")
        # The upstream's EOF: it is no longer read; the end: both closed, no DEL for either.
        assert [call for call, _ in counting.calls] == ["unregister"]
    finally:
        lab.reactor._poller = poller
