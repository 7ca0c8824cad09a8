"""
A connection that ended is freed by reference counting alone: nothing of
it is left for the cyclic GC, whose collections cost CPU per connection
and walk every live object besides (bench/README.md, "Branch gccycles").

Each test makes a connection of one kind (on fake transports, and one
through the worker's real objects on loopback), ends it, lets go of its own
references and looks, with the cyclic GC off, for any of the connection's
objects still in memory: one left over is held only by a reference cycle.
A connection relayed by a L{tproxy_twist.zerocopy.SplicePump} is freed once
the pump is: the pump's own cycles are not the relay's (a stand-in here).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
from test_relay import FORWARD_ALLOW, GET, OK
from test_relay import Harness as RelayHarness
from test_tls_bump_layer import Harness as BumpHarness
from test_tls_bump_layer import hello
from twisted.internet import error as neterror
from twisted.python.failure import Failure

from tproxy_twist.http.relay import ClientConnection, ReadGate, Upstream
from tproxy_twist.http.session import Link, Session
from tproxy_twist.testing import FakeTransport
from tproxy_twist.tls.bump import OriginAttempt
from tproxy_twist.tls.layer import BUMPED, SpliceUpstream, TLSConnection
from tproxy_twist.tls.testing import make_ca
from tproxy_twist.tls.verify import OriginTLS, OriginTrust, trustRootFromCertificates

# A connection's objects (BumpedClient is a ClientConnection).
_CONNECTION_TYPES = (
    ClientConnection,
    Session,
    Upstream,
    Link,
    ReadGate,
    TLSConnection,
    OriginTLS,
    OriginAttempt,
    SpliceUpstream,
)

DONE = Failure(neterror.ConnectionDone())


def left_for_the_cyclic_gc(run: Callable[[], None]) -> list[str]:
    """
    Run C{run} (which makes connections, ends them and keeps no reference
    to them) with the cyclic GC off; the types of the connection objects it
    made that are still in memory afterwards, which only the cyclic GC
    would free.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects() if isinstance(o, _CONNECTION_TYPES)}
        run()
        return sorted(
            type(o).__qualname__
            for o in gc.get_objects()
            if isinstance(o, _CONNECTION_TYPES) and id(o) not in before
        )
    finally:
        if was_enabled:
            gc.enable()


def _forget(h) -> None:
    """The harness lets go of its connection (it keeps its factory and clock)."""
    h.protocol = h.transport = None
    h.connect.attempts.clear()


def _new_connection(h) -> None:
    """The relay harness's next client connection (a fresh transport, the same factory)."""
    h.protocol = h.factory.buildProtocol(None)
    h.transport = type(h.transport)(host=h.transport.getHost(), peer=h.transport.getPeer())
    h.protocol.makeConnection(h.transport)


def _client_left(h) -> None:
    """The client's connection is closed (its transport gone, the protocol told)."""
    h.transport.disconnected = True
    h.protocol.connectionLost(DONE)


def _made(kind: type) -> None:
    """Evidence that the run made what it is about (else it would prove nothing)."""
    assert any(isinstance(o, kind) for o in gc.get_objects())


# --- plain HTTP ----------------------------------------------------------------------


def test_a_closed_keep_alive_connection_on_a_tproxy_port_leaves_nothing_to_the_cyclic_gc():
    h = RelayHarness()

    def run() -> None:
        _new_connection(h)
        for first in (True, False):
            h.send(GET)
            if first:
                h.upstream()
            h.answer(OK)
        assert h.received().count(b"HTTP/1.1 200 OK") == 2
        assert len(h.connect.attempts) == 1  # one upstream connection, kept alive
        _made(Upstream)
        _client_left(h)  # the client left: the upstream is aborted...
        assert h.connect.last.transport.disconnecting
        h.connect.last.close()  # ...and ends
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_a_keep_alive_connection_on_a_forward_port_leaves_nothing_once_the_origin_closed_first():
    h = RelayHarness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))

    def run() -> None:
        _new_connection(h)
        h.send(b"GET http://203.0.113.2/ HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
        h.upstream()
        h.answer(OK)
        h.connect.last.close()  # the origin closes its idle keep-alive connection
        h.send(b"GET http://203.0.113.2/2 HTTP/1.1\r\nHost: 203.0.113.2\r\n\r\n")
        h.upstream()
        h.answer(OK)
        assert h.received().count(b"HTTP/1.1 200 OK") == 2
        _client_left(h)
        h.connect.last.close()
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_a_connect_tunnel_copied_through_twisted_leaves_nothing_to_the_cyclic_gc():
    h = RelayHarness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))

    def run() -> None:
        _new_connection(h)
        h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
        upstream = h.upstream()
        h.send(b"client bytes")
        h.answer(b"server bytes")
        assert upstream.take() == b"client bytes"
        assert h.received().endswith(b"server bytes")
        h.connect.last.close()  # the origin ends the tunnel: the client is closed
        assert h.transport.closed
        _client_left(h)
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


class _Pump:
    """A stand-in L{SplicePump} that, as the real one once ended, holds nothing of ours."""

    ended = "done"
    a_to_b = b_to_a = 0

    def abort(self) -> None:
        pass


def test_a_spliced_tunnels_connection_lets_go_of_its_pump_and_its_own_methods():
    h = RelayHarness("forward", FORWARD_ALLOW, destination=("198.51.100.1", 3128))

    def run() -> None:
        _new_connection(h)
        h.send(b"CONNECT 203.0.113.2:443 HTTP/1.1\r\nHost: 203.0.113.2:443\r\n\r\n")
        h.upstream()
        # What splice_tunnel does with a pump (fake transports cannot splice).
        h.protocol.pump = _Pump()
        h.protocol.finished = h.protocol._finished_spliced
        _client_left(h)
        h.connect.last.close()
        assert [entry.status for entry in h.entries] == [200]  # the tunnel's record
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_an_upstream_connected_after_its_client_left_is_aborted_and_leaves_nothing():
    h = RelayHarness()

    def run() -> None:
        _new_connection(h)
        h.send(GET)
        _client_left(h)  # before the upstream connection is made
        late = h.upstream()
        assert late.disconnecting  # aborted at once: nobody is left to use it
        h.connect.last.close()
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_an_upstream_failing_or_speaking_after_its_client_left_changes_nothing():
    h = RelayHarness()
    h.send(GET)
    h.upstream()
    h.answer(OK)
    attempt = h.connect.last
    _client_left(h)
    attempt.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")  # late bytes of a closing upstream
    attempt.close()
    assert h.received().count(b"HTTP/1.1 200 OK") == 1
    h2 = RelayHarness()
    h2.send(GET)
    _client_left(h2)
    h2.connect.last.fail(neterror.ConnectionRefusedError())
    assert [entry.status for entry in h2.entries] == [0]  # the client's leaving, nothing more


# --- bumped TLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origins() -> OriginTrust:
    from twisted.internet.ssl import Certificate

    ca = make_ca("freed connections test CA")
    return OriginTrust(trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem)]))


_REQUEST = b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n"
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _bumped(h, *answers: bytes):
    """A new bumped connection, one request answered with each of C{answers}: its origin."""
    h.new_connection()
    h.protocol.dataReceived(hello())
    origin, origin_transport = h.verified()
    h.protocol.handshakeCompleted()
    assert h.protocol.state == BUMPED
    for answer in answers:
        h.protocol.dataReceived(_REQUEST)
        origin.dataReceived(answer)
    return origin, origin_transport


def test_a_closed_bumped_connection_leaves_nothing_to_the_cyclic_gc(origins):
    h = BumpHarness(origins)
    _forget(h)

    def run() -> None:
        origin, origin_transport = _bumped(h, _OK, _OK)
        assert h.transport.value().count(b"HTTP/1.1 200 OK") == 2
        _made(Upstream)
        _client_left(h)  # the client left: the origin is aborted...
        assert origin_transport.disconnecting
        origin_transport.disconnected = True
        origin.connectionLost(DONE)  # ...and ends
        assert len(h.entries) == 3  # two requests, the connection's own line
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_a_bumped_connection_whose_origin_closed_first_leaves_nothing(origins):
    h = BumpHarness(origins)
    _forget(h)

    def run() -> None:
        origin, origin_transport = _bumped(h, _OK)
        origin_transport.disconnected = True
        origin.connectionLost(DONE)
        _client_left(h)
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


def test_a_further_origin_verified_after_the_bumped_client_left_is_aborted(origins):
    h = BumpHarness(origins)
    _forget(h)

    def run() -> None:
        origin, origin_transport = _bumped(
            h, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        origin_transport.disconnected = True
        origin.connectionLost(DONE)
        h.protocol.dataReceived(b"GET /2 HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        assert len(h.connect.attempts) == 2  # a further origin connection, being verified
        _client_left(h)
        second, second_transport = h.verified()  # verified after the client left
        assert second_transport.disconnecting
        second_transport.disconnected = True
        second.connectionLost(DONE)
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []


# --- the worker's real objects on loopback ---------------------------------------------------


def test_a_keep_alive_connection_through_real_sockets_leaves_nothing_to_the_cyclic_gc():
    import socket

    from tproxy_twist.reactor import WorkerReactor
    from tproxy_twist.testing import iterate_until, loopback_forward_factory

    reactor = WorkerReactor()
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen()
    origin.setblocking(False)
    origin_port = origin.getsockname()[1]
    factory = loopback_forward_factory(reactor, origin_port)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    request = f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    def run() -> None:
        client = socket.create_connection(("127.0.0.1", listening.getHost().port))
        client.setblocking(False)
        served: list[socket.socket] = []
        answers: list[bytes] = []

        def accepted() -> bool:
            try:
                served.append(origin.accept()[0])
            except BlockingIOError:
                return False
            return True

        def received(what: bytes, sock: socket.socket, into: list[bytes]) -> Callable[[], bool]:
            def done() -> bool:
                try:
                    into.append(sock.recv(65536))
                except BlockingIOError:
                    pass
                return what in b"".join(into)

            return done

        for n in (1, 2):
            client.sendall(request)
            if n == 1:
                iterate_until(reactor, accepted, "the upstream connection")
                served[0].setblocking(False)
            asked: list[bytes] = []
            iterate_until(reactor, received(b"\r\n\r\n", served[0], asked), "a request upstream")
            served[0].sendall(OK)
            iterate_until(reactor, received(b"hello", client, answers), "the answer")
            answers.clear()
        assert len(factory.connections) == 1
        _made(Upstream)
        client.close()
        iterate_until(reactor, lambda: not factory.connections, "the client connection's end")
        gone: list[bytes] = []

        def upstream_closed() -> bool:
            try:
                gone.append(served[0].recv(65536))
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            return gone[-1] == b""

        iterate_until(reactor, upstream_closed, "the upstream connection's end")
        served[0].close()
        for _ in range(3):  # Twisted's connectionLost calls of the closed sockets
            reactor.iterate(0.01)

    try:
        assert left_for_the_cyclic_gc(run) == []
    finally:
        listening.stopListening()
        origin.close()
        factory.shutdown()


# --- spliced TLS ---------------------------------------------------------------------------


def test_a_spliced_tls_connection_copied_through_twisted_leaves_nothing_to_the_cyclic_gc():
    from test_tls_layer import HELLO_BYTES
    from test_tls_layer import Harness as TLSHarness

    from tproxy_twist.tls.layer import RELAYING

    h = TLSHarness()
    host, peer = h.transport.getHost(), h.transport.getPeer()
    _forget(h)

    def run() -> None:
        h.protocol = h.factory.buildProtocol(None)
        h.transport = FakeTransport(host=host, peer=peer)
        h.protocol.makeConnection(h.transport)
        h.send(HELLO_BYTES)
        upstream = h.connect.last.succeed()
        assert h.protocol.state == RELAYING and upstream.take() == HELLO_BYTES
        _made(SpliceUpstream)
        h.connect.last.protocol.dataReceived(b"server flight")
        assert h.received() == b"server flight"
        h.lose()  # the client left: the upstream is aborted...
        assert upstream.disconnecting
        h.connect.last.close()  # ...and ends
        (entry,) = h.entries
        assert entry.destination == "203.0.113.2:443"  # the line names where it went
        _forget(h)

    assert left_for_the_cyclic_gc(run) == []
