"""The workers' reactor still does everything the epoll reactor does."""

import socket
import subprocess
import sys

from tproxy_twist.testing import iterate_until

SCRIPT = r"""
from tproxy_twist.reactor import WorkerReactor, install
reactor = install()
assert isinstance(reactor, WorkerReactor)
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

failures = []
def observe(event):
    if event.get("log_failure") or event.get("failure") or event.get("isError"):
        failures.append(event)
globalLogPublisher.addObserver(observe)
result = {}

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise RuntimeError("a bug in a protocol")
        self.transport.write(data)

class Client(protocol.Protocol):
    def __init__(self, payload, key):
        self.payload, self.key, self.got = payload, key, b""
    def connectionMade(self):
        self.transport.write(self.payload)
    def dataReceived(self, data):
        self.got += data
        if self.got == self.payload:
            result[self.key] = "echoed"
            self.transport.loseConnection()
    def connectionLost(self, reason):
        result.setdefault(self.key, "closed")
        if len(result) == 2:
            reactor.stop()

port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
for payload, key in ((b"hello", "echo"), (b"boom", "bug")):
    f = protocol.ClientFactory()
    f.buildProtocol = lambda addr, p=payload, k=key: Client(p, k)
    reactor.connectTCP("127.0.0.1", port.getHost().port, f)
reactor.callLater(10, reactor.stop)
reactor.run()
print(result["echo"], result["bug"], len(failures))
"""


def test_the_worker_reactor_relays_bytes_and_survives_a_protocol_bug():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # Echo works; the connection whose protocol raised is closed and the error logged.
    assert proc.stdout.split() == ["echoed", "closed", "1"]


class _Reader:
    """A selectable of our own for a socket's file descriptor."""

    def __init__(self, sock):
        self.sock = sock
        self.read = []
        self.writable = 0

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.read.append(self.sock.recv(100))

    def doWrite(self):
        self.writable += 1

    def logPrefix(self):
        return "reader"

    def connectionLost(self, reason):
        pass


def _reactor_and_socketpair():
    """A worker reactor and a connected pair: C{a} (non-blocking) to watch, C{b} to poke it."""
    from tproxy_twist.reactor import WorkerReactor

    a, b = socket.socketpair()
    a.setblocking(False)
    return WorkerReactor(), a, b


def test_a_read_registration_handed_over_delivers_the_next_events_to_the_new_reader():
    reactor, a, b = _reactor_and_socketpair()
    old, new = _Reader(a), _Reader(a)
    reactor.addReader(old)
    assert reactor.hand_over_reader(old, new)
    b.send(b"ping")
    iterate_until(reactor, lambda: new.read, "the new reader reads")
    assert new.read == [b"ping"] and old.read == []
    # A selectable that is not the registered reader, or is also writing, is refused.
    assert not reactor.hand_over_reader(old, new)
    reactor.addWriter(new)
    assert not reactor.hand_over_reader(new, old)
    reactor.removeReader(new)
    reactor.removeWriter(new)
    assert a.fileno() not in reactor._selectables
    a.close()
    b.close()


def test_reading_and_writing_added_at_once_wake_both_and_are_removed_separately():
    reactor, a, b = _reactor_and_socketpair()
    reader = _Reader(a)
    reactor.add_reader_and_writer(reader)
    b.send(b"ping")
    iterate_until(reactor, lambda: reader.read and reader.writable, "readable and writable")
    reactor.removeWriter(reader)
    writable = reader.writable
    b.send(b"pong")
    iterate_until(reactor, lambda: len(reader.read) == 2, "read again")
    assert reader.writable == writable and reader.read == [b"ping", b"pong"]
    # Already watched: the same as addReader and addWriter.
    reactor.add_reader_and_writer(reader)
    assert a.fileno() in reactor._reads and a.fileno() in reactor._writes
    reactor.removeReader(reader)
    reactor.removeWriter(reader)
    assert a.fileno() not in reactor._selectables
    a.close()
    b.close()


def test_set_interest_changes_reading_and_writing_together_with_one_epoll_call():
    reactor, a, b = _reactor_and_socketpair()
    reader = _Reader(a)
    calls = []
    poller = reactor._poller

    class Counting:
        def __getattr__(self, name):
            method = getattr(poller, name)
            if name in ("register", "modify", "unregister"):
                return lambda *args: (calls.append(name), method(*args))[1]
            return method

    reactor._poller = Counting()
    reactor.set_interest(reader, False, True)  # writing only
    iterate_until(reactor, lambda: reader.writable, "writable")
    reactor.set_interest(reader, True, False)  # both change: one call
    b.send(b"ping")
    iterate_until(reactor, lambda: reader.read, "readable")
    writable = reader.writable
    reactor.set_interest(reader, True, False)  # no change: no call
    b.send(b"pong")
    iterate_until(reactor, lambda: len(reader.read) == 2, "read again")
    assert reader.writable == writable
    reactor.set_interest(reader, False, False)
    assert calls == ["register", "modify", "unregister"]
    fd = a.fileno()
    assert fd not in reactor._reads and fd not in reactor._writes
    assert fd not in reactor._selectables
    reactor._poller = poller
    a.close()
    b.close()


def test_forget_drops_a_registration_without_a_system_call_for_a_socket_closed_next():
    reactor, a, b = _reactor_and_socketpair()
    reader, other = _Reader(a), _Reader(a)
    reactor.addReader(reader)
    reactor.forget(other)  # not the registered selectable: left be
    assert reactor._selectables[a.fileno()] is reader
    reactor.forget(reader)
    fd = a.fileno()
    assert fd not in reactor._reads and fd not in reactor._selectables
    a.close()  # which takes it out of epoll
    b.close()
    c, d = socket.socketpair()  # may reuse the number: registering it works
    c.setblocking(False)
    again = _Reader(c)
    reactor.addReader(again)
    d.send(b"x")
    iterate_until(reactor, lambda: again.read, "the new socket read")
    reactor.removeReader(again)
    c.close()
    d.close()


def test_an_error_escaping_an_event_is_logged_once_per_interval_and_the_batch_goes_on():
    from twisted.logger import globalLogPublisher

    reactor, a, b = _reactor_and_socketpair()
    broken, healthy = _Reader(a), _Reader(b)
    reactor.addReader(broken)
    reactor.addReader(healthy)
    handle = reactor._doReadOrWrite

    def handle_or_fail(selectable, fd, event):
        if selectable is broken:
            raise RuntimeError("a bug in the reactor loop")
        handle(selectable, fd, event)

    reactor._doReadOrWrite = handle_or_fail
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for i in range(100):
            b.send(b"x")
            a.send(b"y")
            iterate_until(reactor, lambda i=i: len(healthy.read) > i, "the healthy reader reads")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [e for e in logged if e.get("log_failure") is not None]
    # 100 batches, each with the failing event: one line, and every other event handled.
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert len(healthy.read) >= 100
    reactor.removeReader(broken)
    reactor.removeReader(healthy)
    a.close()
    b.close()
