"""
L{send_directly}: after C{startTLS}, what a protocol writes is encrypted at
once and its records go straight to the socket (no reactor turn, no epoll
registration) when nothing is buffered; otherwise into the TCP transport's
buffer, encrypted once.  Real sockets on loopback, the worker's reactor, and
a client made of Python's C{ssl} memory BIOs driven by the test.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.testing import FakeTransport
from tproxy_twist.tls.direct import send_directly
from tproxy_twist.tls.testing import make_ca, make_server_cert


@implementer(IHandshakeListener)
class Server(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.handshaken = False

    def handshakeCompleted(self) -> None:
        self.handshaken = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class Client:
    """A TLS client over a blocking-free socket, pumped by the test."""

    def __init__(self, sock: socket.socket, ca_pem: bytes) -> None:
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.sock = sock
        sock.setblocking(False)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="direct.test")
        self.plain = bytearray()
        self.closed = False

    def pump(self) -> None:
        """Send what the client has to send, read what arrived, decrypt it."""
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            if not data:
                self.incoming.write_eof()
                break
            self.incoming.write(data)
        while True:
            try:
                chunk = self.tls.read(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLEOFError):
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:  # close_notify (no data at all raises SSLWantReadError)
                self.closed = True
                break
            self.plain += chunk
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)


def accept(reactor) -> tuple[object, socket.socket]:
    """A real accepted TCP transport and the test's socket at the other end."""
    accepted: list[Protocol] = []

    class Accept(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Accept), interface="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port.getHost().port))
    for _ in range(200):
        if accepted:
            break
        reactor.iterate(0.01)
    port.stopListening()
    return accepted[0].transport, sock


def server_options(cert):
    from OpenSSL import crypto

    return CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, cert.key_pem),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert.cert_pem),
    )


@pytest.fixture
def pair():
    """A handshaken TLS connection: (reactor, the server's transport and protocol, the client)."""
    reactor = WorkerReactor()
    ca = make_ca("direct test CA")
    cert = make_server_cert(["direct.test"], ca)
    options = server_options(cert)
    transport, sock = accept(reactor)
    server = Server()
    transport.protocol = server
    server.makeConnection(transport)
    transport.startTLS(options)
    assert send_directly(transport)
    client = Client(sock, ca.cert_pem)
    for _ in range(200):
        try:
            client.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            client.pump()
            reactor.iterate(0.01)
    else:
        pytest.fail("no handshake")
    for _ in range(200):  # the server has the client's Finished
        client.pump()
        if server.handshaken:
            break
        reactor.iterate(0.01)
    client.pump()  # its tickets, if any
    yield reactor, transport, server, client
    sock.close()
    if transport.connected:
        transport.abortConnection()
        reactor.iterate(0)


def receive_without_the_reactor(client: Client, size: int) -> bytearray:
    """What the client gets while the reactor does not run (the kernel may take a moment)."""
    deadline = time.monotonic() + 10
    while len(client.plain) < size and time.monotonic() < deadline:
        client.pump()
        time.sleep(0.001)
    return client.plain


def test_a_write_is_on_the_socket_when_write_returns(pair):
    reactor, transport, server, client = pair
    transport.write(b"hello")
    assert reactor.getDelayedCalls() == [] and not transport.dataBuffer
    assert receive_without_the_reactor(client, 5) == b"hello"


def test_write_sequence_is_one_write(pair):
    reactor, transport, server, client = pair
    transport.writeSequence([b"a", b"b", b"c"])
    assert receive_without_the_reactor(client, 3) == b"abc"


def test_what_the_socket_does_not_take_is_buffered_encrypted_once_and_arrives_whole(pair):
    reactor, transport, server, client = pair
    data = bytes(range(256)) * 32768  # 8 MiB: more than the socket buffers hold
    transport.write(data)
    assert transport.dataBuffer or transport._tempDataBuffer  # the rest waits in Twisted
    deadline = time.monotonic() + 60
    while len(client.plain) < len(data) and time.monotonic() < deadline:
        client.pump()
        reactor.iterate(0.001)
    assert len(client.plain) == len(data) and client.plain == data


def test_reading_and_closing_stay_twisteds(pair):
    reactor, transport, server, client = pair
    client.tls.write(b"ping")
    client.pump()
    for _ in range(200):
        if server.received:
            break
        reactor.iterate(0.01)
    assert server.received == b"ping"
    transport.write(b"bye")
    transport.loseConnection()  # close_notify after what was written
    for _ in range(200):
        reactor.iterate(0.01)
        client.pump()
        if client.closed:
            break
    assert client.plain == b"bye" and client.closed


def test_a_transport_that_is_not_tcp_is_left_alone():
    transport = FakeTransport()
    assert send_directly(transport) is False


def test_later_tls_connections_build_no_interface_specs(pair, monkeypatch):
    # Twisted's TLS protocol declares its transport's interfaces one by one;
    # zope.interface caches those specs weakly, so without send_directly
    # keeping them every connection builds them again (about 1 ms of CPU).
    from zope.interface import declarations

    reactor = pair[0]
    built = []
    original = declarations.ProvidesClass.__init__

    def counting(self, *args):
        built.append(args)
        original(self, *args)

    monkeypatch.setattr(declarations.ProvidesClass, "__init__", counting)
    transport, sock = accept(reactor)
    try:
        transport.startTLS(server_options(make_server_cert(["again.test"], make_ca())))
        assert send_directly(transport)
        assert built == []
    finally:
        sock.close()
        transport.abortConnection()
