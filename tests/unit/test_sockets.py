"""Socket helpers that can be checked without privileges or namespaces."""

import socket
import time

import pytest
from twisted.internet.task import Clock

from tproxy_twist import sockets
from tproxy_twist.config import ListenAddress


def test_ipv4_mapped_addresses_are_unmapped_and_others_kept():
    assert sockets.unmap("::ffff:198.51.100.2") == "198.51.100.2"
    assert sockets.unmap("2001:db8::1") == "2001:db8::1"
    assert sockets.unmap("198.51.100.2") == "198.51.100.2"


def test_host_addresses_include_loopback():
    assert "127.0.0.1" in sockets.host_addresses()


def test_local_addresses_refresh_after_their_ttl():
    clock = Clock()
    current = {"198.51.100.1"}
    calls = []

    def source():
        calls.append(1)
        return frozenset(current)

    local = sockets.LocalAddresses(clock, ttl=5, source=source)
    assert "198.51.100.1" in local
    current.add("203.0.113.1")
    assert "203.0.113.1" not in local  # cached
    clock.advance(5)
    assert "203.0.113.1" in local
    assert len(calls) == 2


def test_local_addresses_keep_the_last_known_set_when_a_refresh_fails():
    clock = Clock()
    answers = [frozenset({"198.51.100.1"}), OSError(24, "Too many open files")]

    def source():
        answer = answers.pop(0) if answers else frozenset({"203.0.113.1"})
        if isinstance(answer, OSError):
            raise answer
        return answer

    local = sockets.LocalAddresses(clock, ttl=5, source=source)
    assert "198.51.100.1" in local
    clock.advance(5)
    assert "198.51.100.1" in local  # the refresh failed (EMFILE): no exception, old set
    assert "203.0.113.1" in local  # and the next look retries


@pytest.mark.parametrize("host", ["127.0.0.5", "::1", "0.0.0.0", "::"])
def test_loopback_and_unspecified_are_always_local(host):
    local = sockets.LocalAddresses(Clock(), source=frozenset)
    assert host in local


def test_listening_socket_has_reuseport_and_serves_both_families():
    sock = sockets.listening_socket(ListenAddress("::", 0), transparent=False)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert not sock.getblocking()
    finally:
        sock.close()


def test_two_listeners_can_share_a_port_through_reuseport():
    first = sockets.listening_socket(ListenAddress("127.0.0.1", 0), transparent=False)
    port = first.getsockname()[1]
    second = sockets.listening_socket(ListenAddress("127.0.0.1", port), transparent=False)
    first.close()
    second.close()


def test_nat_original_destination_of_a_connection_that_was_not_redirected_fails():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        with pytest.raises(OSError):
            sockets.nat_original_destination(accepted)
    finally:
        for s in (client, accepted, server):
            s.close()


# --- the upstream connector: real loopback sockets, the worker's reactor ---------------


class _Recorder:
    """A client factory that records what the connector reports, and when."""

    def __init__(self):
        from twisted.internet.protocol import ClientFactory, Protocol

        self.events = []
        recorder = self

        class Proto(Protocol):
            def connectionMade(self):
                recorder.events.append(("made", self.transport))

            def dataReceived(self, data):
                recorder.events.append(("data", data))

        class Factory(ClientFactory):
            noisy = False
            protocol = Proto

            def clientConnectionFailed(self, connector, reason):
                recorder.events.append(("failed", reason.value))

        self.factory = Factory()


def _spin(reactor, until, turns=500):
    for _ in range(turns):
        if until():
            return
        reactor.iterate(0.01)


def test_upstream_connection_to_a_listener_is_made_and_carries_bytes_both_ways():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    recorder = _Recorder()
    connect = sockets.connect_upstream(reactor)
    connect("127.0.0.1", listener.getsockname()[1], recorder.factory, 5, None)
    assert recorder.events == []  # nothing is reported from inside connect()
    peer, _ = listener.accept()
    _spin(reactor, lambda: recorder.events)
    kind, transport = recorder.events[0]
    assert kind == "made"
    # Nagle is off from the start; after connecting the socket is only read, not watched
    # for writability (which would wake the reactor in a loop).
    assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert transport.fileno() in reactor._reads
    assert transport.fileno() not in reactor._writes
    transport.write(b"to the origin")
    _spin(reactor, lambda: False, turns=5)
    assert peer.recv(100) == b"to the origin"
    peer.sendall(b"from the origin")
    _spin(reactor, lambda: len(recorder.events) > 1)
    assert recorder.events[1] == ("data", b"from the origin")
    transport.abortConnection()
    peer.close()
    listener.close()


def test_upstream_connection_refused_is_reported_as_refused_after_connect_returns():
    from twisted.internet.error import ConnectionRefusedError

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    recorder = _Recorder()
    sockets.connect_upstream(reactor)("127.0.0.1", port, recorder.factory, 5, None)
    assert recorder.events == []
    _spin(reactor, lambda: recorder.events)
    assert len(recorder.events) == 1
    kind, error = recorder.events[0]
    assert kind == "failed" and isinstance(error, ConnectionRefusedError)
    # The failed attempt's socket is no longer watched.
    assert not any(isinstance(s, sockets._UpstreamClient) for s in reactor._selectables.values())


def test_upstream_connection_failing_at_once_is_reported_a_turn_later():
    # connect() to an unroutable address fails inside connect_ex (ENETUNREACH,
    # or EINVAL/EAFNOSUPPORT for a bad family): the factory hears of it after
    # connect_upstream's call returned, never from inside it.
    from twisted.internet.error import ConnectError

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    recorder = _Recorder()
    sockets.connect_upstream(reactor)("255.255.255.255", 80, recorder.factory, 5, None)
    assert recorder.events == []
    _spin(reactor, lambda: recorder.events)
    kind, error = recorder.events[0]
    assert kind == "failed" and isinstance(error, ConnectError)


def test_upstream_connection_that_never_completes_times_out():
    from twisted.internet.error import TimeoutError

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    # Fill the accept queue: Linux drops the next SYN (tcp_abort_on_overflow 0),
    # so the connection attempt hangs until the connector's timeout.
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    recorder = _Recorder()
    sockets.connect_upstream(reactor)(
        "127.0.0.1", listener.getsockname()[1], recorder.factory, 0.2, None
    )
    _spin(reactor, lambda: recorder.events)
    kind, error = recorder.events[0]
    assert kind == "failed" and isinstance(error, TimeoutError)
    for s in fillers:
        s.close()
    listener.close()


def test_a_listener_gives_accepted_connections_tcp_nodelay():
    listener = sockets.listening_socket(ListenAddress("127.0.0.1", 0), transparent=False)
    client = socket.create_connection(listener.getsockname())
    listener.setblocking(True)
    accepted, _ = listener.accept()
    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for s in (client, accepted, listener):
        s.close()


# --- DirectWriter: backpressure registered when a write is buffered --------------------


def _accepted_pair(reactor):
    """A real accepted tcp.Server transport (worker reactor) and the test's peer socket."""
    from twisted.internet.protocol import Factory, Protocol

    accepted = []

    class Keep(Protocol):
        def connectionMade(self):
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Keep), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    _spin(reactor, lambda: accepted)
    port.stopListening()
    return accepted[0].transport, peer


class _Producer:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def test_a_producer_is_registered_only_once_a_write_is_buffered():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    transport, peer = _accepted_pair(reactor)
    writer = sockets.DirectWriter(transport)
    producer = _Producer()
    writer.set_producer(producer)
    writer.write(b"x" * 1000)
    writer.write_sequence([b"head", b"body"])
    # The socket took it all: nothing to pause for, no registration.
    assert transport.producer is None and producer.calls == []
    assert peer.recv(2000) == b"x" * 1000 + b"headbody"
    transport.abortConnection()
    peer.close()


@pytest.mark.parametrize("held", [False, True], ids=["sent at once", "held to the batch's end"])
def test_a_slow_reader_pauses_the_producer_and_resumes_it_once_it_has_read(held):
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    transport, peer = _accepted_pair(reactor)
    # Small kernel buffers both ends, so that Twisted has to buffer soon.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = sockets.DirectWriter(transport)
    producer = _Producer()
    writer.set_producer(producer)
    written = bytearray()
    if held:
        batch = sockets.hold_writes()
        written += bytes(range(256)) * 4096  # 1 MiB, far more than the socket takes
        writer.write(bytes(written))
        assert transport.producer is None and producer.calls == []  # nothing sent yet
        sockets.release_writes(batch)
    else:
        chunk = b"y" * 65536
        while "pause" not in producer.calls and len(written) < 1024 * len(chunk):
            writer.write(chunk)  # the peer reads nothing: the kernel fills, then Twisted buffers
            written += chunk
    assert transport.producer is producer
    assert producer.calls == ["pause"]
    peer.setblocking(False)
    received = bytearray()

    def drained():
        try:
            while chunk := peer.recv(1 << 20):
                received.extend(chunk)
        except BlockingIOError:
            pass
        return len(received) == len(written)

    _spin(reactor, drained, turns=2000)
    assert received == written
    assert producer.calls == ["pause", "resume"]
    transport.abortConnection()
    peer.close()


def test_a_dropped_producer_is_unregistered_and_not_registered_again():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    transport, peer = _accepted_pair(reactor)
    writer = sockets.DirectWriter(transport)
    first, second = _Producer(), _Producer()
    writer.set_producer(first)
    transport.registerProducer(first, True)  # as if a write had been buffered
    writer.set_producer(second)  # the next upstream: the old one goes
    assert transport.producer is None
    writer.drop_producer(second)
    transport.write(b"z" * (1 << 22))  # buffered; nothing may be registered for it now
    writer.write(b"more")
    assert transport.producer is None
    transport.abortConnection()
    peer.close()


@pytest.mark.parametrize(
    "family, host, source",
    [(socket.AF_INET, "127.0.0.1", "127.0.0.2"), (socket.AF_INET6, "::1", "::1")],
)
def test_upstream_connection_is_bound_to_the_given_source_address(family, host, source):
    from twisted.internet.address import IPv4Address, IPv6Address

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen()
    recorder = _Recorder()
    connector = sockets._UpstreamConnector(
        host, listener.getsockname()[1], recorder.factory, 5, (source, 0), reactor
    )
    connector.connect()
    peer, peer_address = listener.accept()
    assert peer_address[0] == source  # the origin sees the address we bound to
    _spin(reactor, lambda: recorder.events)
    kind, transport = recorder.events[0]
    assert kind == "made"
    expected = IPv6Address if family == socket.AF_INET6 else IPv4Address
    assert isinstance(transport.getPeer(), expected)
    assert transport.getPeer().host == host
    assert isinstance(connector.getDestination(), expected)
    transport.abortConnection()
    peer.close()
    listener.close()


def test_upstream_connection_whose_source_cannot_be_bound_fails_with_a_bind_error():
    from twisted.internet.error import ConnectBindError

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    recorder = _Recorder()
    # 192.0.2.1 is not an address of this host, and the socket is not transparent.
    connector = sockets._UpstreamConnector(
        "127.0.0.1", 9, recorder.factory, 5, ("192.0.2.1", 0), reactor
    )
    connector.connect()
    assert recorder.events == []
    _spin(reactor, lambda: recorder.events)
    kind, error = recorder.events[0]
    assert kind == "failed" and isinstance(error, ConnectBindError)


def _connected_upstream(reactor, factory):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connector = sockets.connect_upstream(reactor)(
        "127.0.0.1", listener.getsockname()[1], factory, 5, None
    )
    peer, _ = listener.accept()
    listener.close()
    return connector, peer


def test_an_established_upstream_lets_its_connector_go_when_the_factory_ignores_the_end():
    import gc
    import weakref

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    recorder = _Recorder()
    connector, peer = _connected_upstream(reactor, recorder.factory)
    _spin(reactor, lambda: recorder.events)
    transport = recorder.events[0][1]
    assert transport.connector is not connector
    gone = weakref.ref(connector)
    del connector
    gc.collect()
    assert gone() is None  # neither the Connector nor (through it) the factory is kept
    lost = []
    transport.protocol.connectionLost = lost.append
    peer.close()
    _spin(reactor, lambda: lost)
    assert len(lost) == 1  # the connection still ends normally


def _upstream_that_tells_its_end(reactor):
    """
    An established upstream connection whose factory wants to hear of its
    end: (its transport, its connector, the peer socket, the reasons heard).
    """
    recorder = _Recorder()
    ended = []
    # (_Recorder makes a factory class of its own for each test.)
    type(recorder.factory).clientConnectionLost = lambda self, connector, reason: ended.append(
        reason
    )
    connector, peer = _connected_upstream(reactor, recorder.factory)
    _spin(reactor, lambda: recorder.events)
    return recorder.events[0][1], connector, peer, ended


def test_a_factory_that_wants_the_end_of_its_connection_is_told():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    transport, connector, peer, ended = _upstream_that_tells_its_end(reactor)
    assert transport.connector is connector
    peer.close()
    _spin(reactor, lambda: ended)
    assert len(ended) == 1


# --- the worker's transports: closing when nothing waits to be written -----------------


class _CountingPoller:
    """The reactor's epoll object, counting the registrations it is asked to change."""

    def __init__(self, poller):
        self._poller = poller
        self.calls = []

    def register(self, fd, mask):
        self.calls.append(("register", fd, mask))
        return self._poller.register(fd, mask)

    def modify(self, fd, mask):
        self.calls.append(("modify", fd, mask))
        return self._poller.modify(fd, mask)

    def unregister(self, fd):
        self.calls.append(("unregister", fd))
        return self._poller.unregister(fd)

    def __getattr__(self, name):
        return getattr(self._poller, name)


def _served_pair(reactor):
    """
    A connection accepted by the worker's accept loop, its protocol (which
    records the reasons it was lost in C{lost}) and the peer socket.
    """
    from twisted.internet.protocol import Factory, Protocol

    accepted = []

    class Keep(Protocol):
        def __init__(self):
            self.lost = []

        def connectionMade(self):
            accepted.append(self)

        def connectionLost(self, reason):
            self.lost.append(reason)

    port = reactor.listenTCP(0, Factory.forProtocol(Keep), interface="127.0.0.1")
    sockets.serve_accepts(
        port, reactor, room=lambda: 10, may_resume=lambda: True, on_shortage=print
    )
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    _spin(reactor, lambda: accepted)
    port.stopListening()
    return accepted[0], peer


def _read_until_eof(peer) -> bytes:
    peer.settimeout(30)
    received = b""
    while chunk := peer.recv(65536):
        received += chunk
    return received


def test_the_accept_loop_gives_the_worker_transport_with_twisteds_prefix_and_repr():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocol, peer = _served_pair(reactor)
    transport = protocol.transport
    assert isinstance(transport, sockets.AcceptedConnection)
    host, port = peer.getsockname()
    assert transport.logPrefix() == f"Keep,{transport.sessionno},{host}"
    assert repr(transport).startswith(f"<Keep #{transport.sessionno} on ")
    assert transport.getPeer().port == port
    transport.abortConnection()
    _spin(reactor, lambda: transport.disconnected)
    peer.close()


@pytest.mark.parametrize("held", [False, True], ids=["sent at once", "held to the batch's end"])
def test_an_idle_connection_closes_on_the_next_turn_without_waiting_to_be_writable(held):
    from twisted.internet.error import ConnectionDone

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocol, peer = _served_pair(reactor)
    transport = protocol.transport
    fd = transport.fileno()
    reactor._poller = poller = _CountingPoller(reactor._poller)
    batch = sockets.hold_writes() if held else None
    # Nothing buffered: sent at once, or held in the transport's buffer for the
    # batch's end, which comes before the next turn.
    sockets.DirectWriter(transport).write(b"last words")
    shutdowns = []

    class _ShutdownRecorder:
        def __init__(self, real):
            self._real = real

        def shutdown(self, how):
            shutdowns.append(how)
            self._real.shutdown(how)

        def __getattr__(self, name):
            return getattr(self._real, name)

    transport.socket = _ShutdownRecorder(transport.socket)
    transport.loseConnection()
    if batch is not None:
        sockets.release_writes(batch)
    assert not protocol.lost  # never synchronously: the protocol hears of it a turn later
    _spin(reactor, lambda: protocol.lost)
    assert protocol.lost[0].check(ConnectionDone)
    # Reading stopped (one DEL); never watched for writing, no shutdown() before close().
    assert poller.calls == [("unregister", fd)]
    assert shutdowns == []
    assert _read_until_eof(peer) == b"last words"
    peer.close()


def test_bytes_written_after_lose_connection_still_go_out_before_the_close():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocol, peer = _served_pair(reactor)
    transport = protocol.transport
    transport.loseConnection()
    transport.write(b"after")  # Twisted's contract: written, then closed
    transport.write(b"x" * 4_000_000)  # more than the socket takes at once
    _spin(reactor, lambda: transport.dataBuffer or transport._tempDataLen)
    received = b""
    peer.setblocking(False)
    deadline = time.monotonic() + 60
    while not protocol.lost:  # the reactor writes while the test reads, until the close
        assert time.monotonic() < deadline, "the connection never closed"
        reactor.iterate(0.01)
        try:
            received += peer.recv(1 << 20)
        except BlockingIOError:
            pass
    received += _read_until_eof(peer)
    assert received == b"after" + b"x" * 4_000_000
    peer.close()


def test_an_idle_upstream_connection_closes_the_same_way_and_tells_its_factory():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    transport, _, peer, ended = _upstream_that_tells_its_end(reactor)
    reactor._poller = poller = _CountingPoller(reactor._poller)
    fd = transport.fileno()
    transport.loseConnection()
    _spin(reactor, lambda: ended)
    assert len(ended) == 1
    assert poller.calls == [("unregister", fd)]
    assert _read_until_eof(peer) == b""
    peer.close()


def test_an_idle_connection_aborted_before_its_close_is_lost_once():
    from twisted.internet.error import ConnectionAborted

    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocol, peer = _served_pair(reactor)
    transport = protocol.transport
    transport.loseConnection()
    transport.abortConnection()
    _spin(reactor, lambda: protocol.lost)
    for _ in range(5):
        reactor.iterate(0)
    assert len(protocol.lost) == 1
    assert protocol.lost[0].check(ConnectionAborted)
    peer.close()


# --- DirectWriter: writes held to the end of the reactor's batch of events --------------


@pytest.fixture(autouse=True)
def _no_batch_left_holding():
    """A test that fails between hold_writes and release_writes leaves no holding behind."""
    yield
    sockets._held = None


class _Replier:
    """
    A served connection's protocol that answers each read with C{b"re:" + data}
    through a DirectWriter, having first looked how many of the other peers
    already have their answer (C{seen}: one count per read).
    """

    def __init__(self, peers, seen):
        self._peers = peers
        self._seen = seen
        self.lost = []

    def makeConnection(self, transport):
        self.transport = transport
        self.writer = sockets.DirectWriter(transport)

    def dataReceived(self, data):
        self._seen.append(sum(_readable(peer) for peer in self._peers))
        self.writer.write(b"re:" + data)

    def connectionLost(self, reason):
        self.lost.append(reason)


def _readable(peer) -> bool:
    try:
        return bool(peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _replying_pairs(reactor, n):
    """C{n} connections served by the accept loop, with L{_Replier}s: (protocols, peers, seen)."""
    from twisted.internet.protocol import Factory

    protocols, peers, seen = [], [], []

    class _Factory(Factory):
        def buildProtocol(self, addr):
            protocols.append(_Replier(peers, seen))
            return protocols[-1]

    port = reactor.listenTCP(0, _Factory(), interface="127.0.0.1", backlog=n)
    sockets.serve_accepts(port, reactor, room=lambda: n, may_resume=lambda: True, on_shortage=print)
    for _ in range(n):
        peers.append(socket.create_connection(("127.0.0.1", port.getHost().port)))
    _spin(reactor, lambda: len(protocols) == n)
    port.stopListening()
    assert len(protocols) == n
    return protocols, peers, seen


def _close_all(reactor, protocols, peers):
    for protocol in protocols:
        protocol.transport.abortConnection()
    _spin(reactor, lambda: all(p.lost for p in protocols))
    for peer in peers:
        peer.close()


def test_answers_written_while_a_batch_of_events_is_handled_leave_when_it_is_handled():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocols, peers, seen = _replying_pairs(reactor, 3)
    for i, peer in enumerate(peers):
        peer.sendall(b"%d" % i)  # all three readable before the reactor looks: one batch
    _spin(reactor, lambda: len(seen) == 3)
    # No answer had left while the batch was handled; all had when it was.
    assert seen == [0, 0, 0]
    for i, peer in enumerate(peers):
        peer.settimeout(30)
        assert peer.recv(100) == b"re:%d" % i
    # Outside a batch (a timer, say) a write goes at once.
    protocols[0].writer.write(b"now")
    assert peers[0].recv(100) == b"now"
    _close_all(reactor, protocols, peers)


def test_a_long_batch_sends_what_it_holds_every_so_many_sockets():
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    n = sockets.HELD_WRITERS + 6
    protocols, peers, seen = _replying_pairs(reactor, n)
    for peer in peers:
        peer.sendall(b"x")
    _spin(reactor, lambda: len(seen) == n)
    # The first HELD_WRITERS answers left once that many were held, the rest at the end.
    assert seen == [0] * sockets.HELD_WRITERS + [sockets.HELD_WRITERS] * 6
    for peer in peers:
        peer.settimeout(30)
        assert peer.recv(100) == b"re:x"
    _close_all(reactor, protocols, peers)


class _SendRecorder:
    """A socket that records its send and sendmsg calls."""

    def __init__(self, real):
        self._real = real
        self.sends = []

    def send(self, data):
        self.sends.append([bytes(data)])
        return self._real.send(data)

    def sendmsg(self, parts):
        self.sends.append([bytes(p) for p in parts])
        return self._real.sendmsg(parts)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _holding_writer():
    """
    A served connection (worker reactor) whose socket records its sends, its
    DirectWriter, and a batch of events begun: (reactor, protocol, peer, the
    recorder, the writer, the batch's list of holders).
    """
    from tproxy_twist.reactor import WorkerReactor

    reactor = WorkerReactor()
    protocol, peer = _served_pair(reactor)
    protocol.transport.socket = recorder = _SendRecorder(protocol.transport.socket)
    writer = sockets.DirectWriter(protocol.transport)
    return reactor, protocol, peer, recorder, writer, sockets.hold_writes()


def _end(reactor, protocol, peer) -> None:
    protocol.transport.abortConnection()
    _spin(reactor, lambda: protocol.lost)
    peer.close()


def test_held_writes_to_one_socket_leave_in_order_in_one_system_call():
    reactor, protocol, peer, recorder, writer, held = _holding_writer()
    writer.write(b"head ")
    writer.write_sequence([b"body ", b"more "])
    writer.write(b"end")
    assert recorder.sends == [] and held == [writer]
    sockets.release_writes(held)
    assert recorder.sends == [[b"head ", b"body ", b"more ", b"end"]]
    assert held == []
    peer.settimeout(30)
    received = b""
    while len(received) < 18:
        received += peer.recv(100)
    assert received == b"head body more end"
    _end(reactor, protocol, peer)


def test_a_held_write_waits_in_the_transport_buffer_where_a_pump_taking_the_socket_finds_it():
    from tproxy_twist import zerocopy

    reactor, protocol, peer, recorder, writer, held = _holding_writer()
    transport = protocol.transport
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    # A CONNECT tunnel's pump takes the socket over in the same batch: it sends
    # what waits first, and the batch's end has nothing left to send.
    assert not zerocopy.can_splice_body(transport, transport)
    assert zerocopy._take_buffered(transport) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    sockets.release_writes(held)
    assert recorder.sends == []
    _end(reactor, protocol, peer)


def test_a_held_write_of_a_connection_aborted_in_the_same_batch_costs_nothing_else():
    from twisted.internet.error import ConnectionAborted

    reactor, protocol, peer, recorder, writer, held = _holding_writer()
    transport = protocol.transport
    writer.write(b"x" * 100)
    transport.abortConnection()
    writer.write(b"y" * 100)
    sockets.release_writes(held)
    # Sent as they would have been had they not been held, then reset.
    assert recorder.sends == [[b"x" * 100, b"y" * 100]]
    _spin(reactor, lambda: protocol.lost)
    for _ in range(5):
        reactor.iterate(0)
    assert len(protocol.lost) == 1 and protocol.lost[0].check(ConnectionAborted)
    assert not transport._tempDataBuffer and not transport.dataBuffer
    peer.close()


def test_held_writes_that_fail_with_a_bug_are_logged_once_per_interval_and_the_rest_are_sent(
    monkeypatch,
):
    logged = []

    class _Log:
        def failure(self, fmt, **fields):
            logged.append(fmt)

    class _Broken:
        def _send_held(self):
            raise RuntimeError("a bug")

    class _Fine:
        sent = 0

        def _send_held(self):
            _Fine.sent += 1

    monkeypatch.setattr(sockets, "_log", _Log())
    monkeypatch.setattr(sockets, "_held_failures", sockets.LogThrottle(sockets._Monotonic()))
    for _ in range(100):
        held = sockets.hold_writes()
        held += [_Broken(), _Fine()]
        sockets.release_writes(held)
    assert _Fine.sent == 100
    assert logged == ["sending a held write failed"]
