"""
The private parts of Twisted that tproxy_twist/reactor.py, sockets.py and
zerocopy.py rely on are still there and still behave as those modules assume.

pyproject.toml caps Twisted below the next release; before raising the cap,
run this file against the new Twisted: each failure names what moved and
which of our modules has to follow.
"""

from __future__ import annotations

import inspect
import socket

import pytest
from twisted.internet import abstract, base, epollreactor, tcp
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.sockets import DirectWriter, _TransparentConnector, _UpstreamClient
from tproxy_twist.zerocopy import _take_buffered


def moved(what: str, who: str) -> str:
    return f"Twisted changed {what}; {who} relies on it: adapt it before raising the Twisted cap"


def connected_pair(reactor):
    """A real accepted tcp.Server transport and the test's own peer socket."""
    accepted = []

    class Keep(Protocol):
        def connectionMade(self):
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Keep), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    for _ in range(200):
        if accepted:
            break
        reactor.iterate(0.01)
    port.stopListening()
    return accepted[0].transport, peer


def test_the_epoll_reactor_internals_the_worker_reactor_overrides():
    # reactor.py replaces doPoll (and doIteration) and calls these itself.
    reactor = WorkerReactor()
    assert "doPoll" in vars(epollreactor.EPollReactor), moved(
        "EPollReactor.doPoll", "tproxy_twist/reactor.py (WorkerReactor.doPoll)"
    )
    assert hasattr(reactor, "_poller") and hasattr(reactor._poller, "poll"), moved(
        "EPollReactor._poller (the select.epoll object)", "tproxy_twist/reactor.py"
    )
    assert isinstance(reactor._selectables, dict), moved(
        "EPollReactor._selectables (fd -> selectable)", "tproxy_twist/reactor.py"
    )
    params = list(inspect.signature(reactor._doReadOrWrite).parameters)
    assert params == ["selectable", "fd", "event"], moved(
        "_PollLikeMixin._doReadOrWrite(selectable, fd, event)", "tproxy_twist/reactor.py"
    )
    assert epollreactor.EPollReactor.doIteration is epollreactor.EPollReactor.doPoll, moved(
        "EPollReactor.doIteration = doPoll", "tproxy_twist/reactor.py (doIteration = doPoll)"
    )


def test_the_reactor_keys_descriptors_by_file_descriptor():
    # zerocopy.py: once a transport stopped reading and writing, another
    # descriptor with the same fd can be registered and gets its events.
    reactor = WorkerReactor()
    transport, peer = connected_pair(reactor)
    transport.stopReading()
    transport.stopWriting()
    assert transport.fileno() not in reactor._selectables, moved(
        "stopReading/stopWriting no longer unregister the fd", "tproxy_twist/zerocopy.py"
    )
    seen = []

    class Other:
        def fileno(self):
            return transport.fileno()

        def doRead(self):
            seen.append(transport.socket.recv(10))

        def logPrefix(self):
            return "other"

        def connectionLost(self, reason):
            seen.append(reason)

    other = Other()
    reactor.addReader(other)
    peer.sendall(b"ping")
    for _ in range(200):
        if seen:
            break
        reactor.iterate(0.01)
    reactor.removeReader(other)
    assert seen == [b"ping"], moved("how readers are registered per fd", "tproxy_twist/zerocopy.py")
    peer.close()
    transport.abortConnection()


def test_the_epoll_reactor_registrations_the_worker_reactor_hooks_read():
    # WorkerReactor.hand_over_reader and add_reader_and_writer keep Twisted's
    # own bookkeeping: fd sets of readers and writers, fd -> selectable.
    reactor = WorkerReactor()
    transport, peer = connected_pair(reactor)
    fd = transport.fileno()
    assert isinstance(reactor._reads, set) and isinstance(reactor._writes, set), moved(
        "EPollReactor._reads/_writes (sets of fds)", "tproxy_twist/reactor.py"
    )
    assert fd in reactor._reads and reactor._selectables[fd] is transport, moved(
        "how addReader records a reader", "tproxy_twist/reactor.py (hand_over_reader)"
    )
    transport.startWriting()
    assert fd in reactor._writes, moved("how addWriter records a writer", "tproxy_twist/reactor.py")
    transport.stopWriting()
    assert fd not in reactor._writes and fd in reactor._reads
    peer.close()
    transport.abortConnection()


def test_a_transport_closes_as_zerocopy_closes_it_after_a_clean_end():
    # zerocopy._close_now: connectionLost(ConnectionDone) closes the socket and
    # tells the protocol; _shouldShutdown skips the shutdown(); _aborting says
    # an abort's own connectionLost is on the way; a second call does nothing.
    assert tcp.Connection._shouldShutdown is True, moved(
        "tcp.Connection._shouldShutdown", "tproxy_twist/zerocopy.py (_close_now)"
    )
    assert "_shouldShutdown" in inspect.getsource(tcp._SocketCloser._closeSocket), moved(
        "_SocketCloser._closeSocket's _shouldShutdown", "tproxy_twist/zerocopy.py"
    )
    assert tcp.Connection._aborting is False, moved(
        "tcp.Connection._aborting", "tproxy_twist/zerocopy.py (_close_now)"
    )
    assert 'hasattr(self, "socket")' in inspect.getsource(tcp.Connection.connectionLost), moved(
        "tcp.Connection.connectionLost no longer ignores a second call", "tproxy_twist/zerocopy.py"
    )


def test_the_connector_builds_its_transport_through_make_transport():
    # sockets.py overrides Connector._makeTransport to get a transparent socket.
    assert "_makeTransport" in vars(tcp.Connector), moved(
        "tcp.Connector._makeTransport", "tproxy_twist/sockets.py (_TransparentConnector)"
    )
    assert "_makeTransport" in inspect.getsource(base.BaseConnector.connect), moved(
        "BaseConnector.connect no longer calls _makeTransport", "tproxy_twist/sockets.py"
    )
    params = list(inspect.signature(tcp.Client.__init__).parameters)
    assert params[:6] == ["self", "host", "port", "bindAddress", "connector", "reactor"], moved(
        "tcp.Client(host, port, bindAddress, connector, reactor)", "tproxy_twist/sockets.py"
    )
    assert "createInternetSocket" in vars(tcp.BaseClient) or hasattr(
        tcp.Client, "createInternetSocket"
    ), moved("tcp.Client.createInternetSocket", "tproxy_twist/sockets.py")
    reactor = WorkerReactor()
    connector = _TransparentConnector("127.0.0.1", 9, ClientFactory(), 1, None, reactor)
    client = connector._makeTransport()
    assert isinstance(client, tcp.Client)
    client.abortConnection()


def test_the_client_internals_the_upstream_client_overrides():
    # sockets._UpstreamClient replaces _finishInit (where Twisted schedules the
    # connection attempt) and relies on what Twisted's own path uses.
    params = list(inspect.signature(tcp.Client._finishInit).parameters)
    assert params == ["self", "whenDone", "skt", "error", "reactor"], moved(
        "_BaseBaseClient._finishInit(whenDone, skt, error, reactor)", "tproxy_twist/sockets.py"
    )
    assert "_finishInit" in inspect.getsource(tcp._BaseTCPClient.__init__), moved(
        "_BaseTCPClient.__init__ no longer ends in _finishInit", "tproxy_twist/sockets.py"
    )
    # _finishInit does what tcp.Connection.__init__ does, without its setblocking().
    source = inspect.getsource(tcp.Connection.__init__)
    assert source.count("self.") == 4 and "abstract.FileDescriptor.__init__" in source, moved(
        "what tcp.Connection.__init__ sets up", "tproxy_twist/sockets.py (_UpstreamClient)"
    )
    for name in ("socket", "setblocking", "fileno", "protocol"):
        assert name in source, moved(f"tcp.Connection.__init__'s {name}", "tproxy_twist/sockets.py")
    for name in ("failIfNotConnected", "_connectDone", "_commonConnection"):
        assert hasattr(tcp.Client, name), moved(f"tcp.Client.{name}", "tproxy_twist/sockets.py")
    assert "_requiresResolution" in inspect.getsource(tcp._BaseTCPClient.__init__), moved(
        "_BaseTCPClient._requiresResolution", "tproxy_twist/sockets.py (_UpstreamClient)"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_upstream_connector_and_client_set_up_what_twisteds_own_do(host, monkeypatch):
    # sockets._UpstreamConnector.__init__ and _UpstreamClient.__init__ are Twisted's,
    # minus the address checks (IP literals only): the same attributes, in the same order.
    reactor = WorkerReactor()
    bind = (host, 0)
    ours = _TransparentConnector(host, 9, ClientFactory(), 1, bind, reactor)
    theirs = tcp.Connector(host, 9, ClientFactory(), 1, bind, reactor)
    ignore = {"factory"}
    assert [(k, v) for k, v in vars(ours).items() if k not in ignore] == [
        (k, v) for k, v in vars(theirs).items() if k not in ignore
    ], moved("what tcp.Connector.__init__ sets up", "tproxy_twist/sockets.py")
    seen = {}

    def capture(self, whenDone, skt, error, reactor):
        seen[type(self)] = ({k: v for k, v in vars(self).items() if k != "connector"}, skt)

    monkeypatch.setattr(tcp.BaseClient, "_finishInit", capture)
    monkeypatch.setattr(_UpstreamClient, "_finishInit", capture)
    _UpstreamClient(host, 9, bind, ours, reactor)
    tcp.Client(host, 9, bind, theirs, reactor)
    (mine, my_socket), (twisteds, their_socket) = seen[_UpstreamClient], seen[tcp.Client]
    assert list(mine.items()) == list(twisteds.items()), moved(
        "what tcp.Client.__init__ sets up before _finishInit", "tproxy_twist/sockets.py"
    )
    assert my_socket.getsockname()[0] == their_socket.getsockname()[0] == host
    my_socket.close()
    their_socket.close()


def test_the_transport_write_buffer_is_where_sockets_and_zerocopy_look():
    # sockets.DirectWriter decides "nothing buffered" from these; zerocopy takes
    # the buffered bytes out of them before splicing.
    reactor = WorkerReactor()
    transport, peer = connected_pair(reactor)
    assert isinstance(transport, tcp.Connection) and isinstance(transport.socket, socket.socket)
    for name in ("dataBuffer", "offset", "_tempDataBuffer", "_tempDataLen"):
        assert hasattr(transport, name), moved(
            f"abstract.FileDescriptor.{name}", "sockets.DirectWriter and zerocopy._take_buffered"
        )
    for name in ("_writeDisconnecting", "_writeDisconnected", "disconnecting", "producer"):
        assert hasattr(transport, name), moved(
            f"abstract.FileDescriptor.{name}", "sockets.DirectWriter and zerocopy.can_splice"
        )
    assert DirectWriter(transport)._idle()
    transport.write(b"first ")
    transport.write(b"second")
    buffered = b"".join(transport._tempDataBuffer)
    assert transport._tempDataLen == 12 and buffered == b"first second", moved(
        "where transport.write() buffers", "sockets.DirectWriter, zerocopy._take_buffered"
    )
    assert not DirectWriter(transport)._idle()
    assert _take_buffered(transport) == b"first second"
    assert DirectWriter(transport)._idle(), moved(
        "what an empty write buffer looks like", "zerocopy._take_buffered"
    )
    # doWrite moves the list buffer into dataBuffer and sends from offset.
    source = inspect.getsource(abstract.FileDescriptor.doWrite)
    for name in ("_tempDataBuffer", "dataBuffer", "offset"):
        assert name in source, moved(f"FileDescriptor.doWrite's use of {name}", "zerocopy.py")
    peer.close()
    transport.abortConnection()


def test_the_pyopenssl_internals_tls_membio_uses():
    # membio.py's fast path (exact BIO lengths, SSL_read into one buffer) needs
    # pyOpenSSL's private binding; without it the module falls back, slower.
    import pytest
    from OpenSSL import SSL

    from tproxy_twist.tls import membio

    assert membio.EXACT_PENDING, "pyOpenSSL moved: tproxy_twist/tls/membio.py falls back"
    tls = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    tls.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        tls.do_handshake()
    assert membio._pending_out(tls) > 0 and membio._pending_in(tls) == 0
    hello = membio._bio_read(tls, membio._pending_out(tls))
    assert hello[:1] == b"\x16" and membio._pending_out(tls) == 0
    assert membio._recv(tls) is None  # waiting for the peer: no WantReadError


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_the_accept_loop_builds_what_twisteds_port_builds(family, host):
    # sockets.serve_accepts replaces tcp.Port.doRead on adopted listeners and uses
    # the port's socket, factory, numberAccepts, sessionno, transport, _buildAddr
    # and reactor as Twisted's own doRead does.
    from tproxy_twist.sockets import serve_accepts

    source = inspect.getsource(tcp.Port.doRead)
    for name in ("self.socket", "self.factory.buildProtocol(self._buildAddr(", "self.sessionno",
                 "self.transport(", "self.numberAccepts"):  # fmt: skip
        assert name in source, moved(f"tcp.Port.doRead ({name})", "tproxy_twist/sockets.py")
    reactor = WorkerReactor()
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(8)
    listener.setblocking(False)
    accepted = []

    class Keep(Protocol):
        def connectionMade(self):
            accepted.append(self)

    port = reactor.adoptStreamPort(listener.fileno(), family, Factory.forProtocol(Keep))
    listener.close()  # the reactor holds its own duplicate
    serve_accepts(port, reactor, room=lambda: 10, may_resume=lambda: True, on_shortage=print)
    peers = [socket.create_connection((host, port.getHost().port)) for _ in range(2)]
    try:
        for _ in range(200):
            if len(accepted) == 2:
                break
            reactor.iterate(0.01)
        [first, second] = accepted
        assert isinstance(first.transport, tcp.Server)  # the worker's subclass of it
        assert first.transport.getPeer().port == peers[0].getsockname()[1]
        assert first.transport.getPeer().host == host
        assert (first.transport.sessionno, second.transport.sessionno) == (0, 1)
        assert first.transport.logstr.startswith("Keep,0,")
    finally:
        for peer in peers:
            peer.close()
        for protocol in accepted:
            protocol.transport.abortConnection()
        port.stopListening()


def test_the_close_of_a_connection_the_worker_transports_shortcut():
    # sockets._ClosesWhenIdle (AcceptedConnection, the upstream client) closes an
    # idle connection itself: it reads the write buffer's state, sets disconnecting
    # and calls connectionLost as the reactor would, and turns shutdown() off with
    # the flag _closeSocket reads; AcceptedConnection sets up what tcp.Server.__init__
    # does, less the two strings it formats (logstr and repstr, made when asked).
    who = "tproxy_twist/sockets.py (_ClosesWhenIdle, AcceptedConnection)"
    assert "self._shouldShutdown" in inspect.getsource(tcp.Connection._closeSocket), moved(
        "tcp.Connection._shouldShutdown", who
    )
    source = inspect.getsource(abstract.FileDescriptor.loseConnection)
    for name in ("self.stopReading()", "self.startWriting()", "self.disconnecting = 1"):
        assert name in source, moved(f"FileDescriptor.loseConnection ({name})", who)
    source = inspect.getsource(tcp.Server.__init__)
    for name in ("Connection.__init__(self, sock, protocol, reactor)", "self.server = server",
                 "self.client = client", "self.sessionno = sessionno",
                 "self.hostname = client[0]", "self.logstr", "self.repstr",
                 "self.startReading()", "self.connected = 1"):  # fmt: skip
        assert name in source, moved(f"tcp.Server.__init__ ({name})", who)
    assert "return self.logstr" in inspect.getsource(tcp.Server.logPrefix) or (
        "return self.logstr" in inspect.getsource(tcp.Connection.logPrefix)
    ), moved("tcp.Server.logPrefix", who)
    assert "return self.repstr" in inspect.getsource(tcp.Server.__repr__), moved(
        "tcp.Server.__repr__", who
    )
    connection = abstract.FileDescriptor(reactor=WorkerReactor())
    for name in ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnecting",
                 "_writeDisconnected", "producer", "disconnecting", "disconnected"):  # fmt: skip
        assert hasattr(connection, name), moved(f"FileDescriptor.{name}", who)
    assert tcp.Connection._aborting is False, moved("tcp.Connection._aborting", who)
