"""
The relay over real loopback sockets (the worker reactor, the real upstream
connector, sockets.DirectWriter): what fake transports cannot show, such as
backpressure that is registered only once a write is really buffered.
"""

from __future__ import annotations

import socket

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.testing import loopback_forward_factory

BODY = 8 * 1024 * 1024


def _spin(reactor, until, turns=3000):
    for _ in range(turns):
        if until():
            return True
        reactor.iterate(0.002)
    return until()


def _proxy(reactor, origin_port):
    # Bodies copied through Python (a spliced body's backpressure is the
    # splice's own: tests/unit/test_zerocopy.py).
    factory = loopback_forward_factory(reactor, origin_port, limits="splice_body_min = 0")
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return factory, listening


def test_a_client_that_does_not_read_pauses_the_upstream_and_gets_everything_later():
    reactor = WorkerReactor()
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen()
    origin_port = origin.getsockname()[1]
    factory, listening = _proxy(reactor, origin_port)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", listening.getHost().port))
    client.sendall(f"GET http://127.0.0.1:{origin_port}/big HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    origin.setblocking(False)
    served = []

    def accepted():
        try:
            served.append(origin.accept()[0])
        except BlockingIOError:
            return False
        return True

    assert _spin(reactor, accepted)
    server = served[0]
    server.setblocking(False)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n".encode()
    outgoing = memoryview(head + b"b" * BODY)
    sent = 0

    def push():
        nonlocal sent
        try:
            while sent < len(outgoing):
                sent += server.send(outgoing[sent : sent + 65536])
        except BlockingIOError:
            pass

    connection = next(iter(factory.connections))

    def upstream_paused():
        push()
        upstream = connection._attached
        if upstream is None:
            return False
        return upstream.transport.fileno() not in reactor._reads

    # The client reads nothing: its kernel buffers fill, then the relay's write
    # is buffered, the producer is registered then and pauses the upstream.
    assert _spin(reactor, upstream_paused)
    assert connection.transport.producer is connection._attached.gate
    held = len(connection.transport.dataBuffer) + connection.transport._tempDataLen
    assert held < 1024 * 1024  # what the relay holds stays bounded
    assert sent < len(outgoing)  # and the origin has been stopped too

    # The client reads: everything arrives, the upstream is read again.
    client.setblocking(False)
    received = bytearray()

    def everything():
        push()
        try:
            while True:
                data = client.recv(1 << 20)
                if not data:
                    break
                received.extend(data)
        except BlockingIOError:
            pass
        end = received.find(b"\r\n\r\n")
        return end >= 0 and len(received) - end - 4 >= BODY

    assert _spin(reactor, everything, turns=20000)
    head_end = received.find(b"\r\n\r\n") + 4
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(received) - head_end == BODY and received[-1:] == b"b"
    for s in (client, server, origin):
        s.close()
    listening.stopListening()
