"""
The client side of a bump through Twisted, over loopback sockets: the
ClientHello is read first (as the TLS layer does to decide), then
L{BumpServerTLS.start} begins TLS with it replayed.  A client trusting the
CA gets the leaf and talks HTTP through it; one that does not refuses it,
and that refusal is recognised.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock

from tproxy_twist.tls.ca import CertificateAuthority, create_ca
from tproxy_twist.tls.leaf import BumpServerTLS, LeafCache
from tproxy_twist.tls.pinning import client_rejected_certificate
from tproxy_twist.tls.testing import make_ca, now_utc
from tproxy_twist.tls.testing import wait_for as wait
from tproxy_twist.tls.verify import OriginTLS, OriginTrust, load_trust_root


class BumpedClientConnection(protocol.Protocol):
    """Reads the hello in plain bytes, bumps, then answers decrypted requests."""

    def __init__(self, server: BumpServerTLS, name: str) -> None:
        self.server = server
        self.name = name
        self.bumped = False
        self.requests = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.bumped:
            self.bumped = True
            self.server.start(self.transport, self.name, data)
            return
        self.requests += data
        if b"\r\n\r\n" in self.requests:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nbumped\n")

    def connectionLost(self, reason=None) -> None:
        self.lost.callback((reason,))  # a Failure as a result, not as an error


class Fetch(protocol.Protocol):
    def __init__(self) -> None:
        self.got = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(data)


@pytest.fixture
def server() -> BumpServerTLS:
    key, certificate = create_ca("bump server test CA", now_utc())
    clock = Clock()
    clock.advance(now_utc().timestamp())
    return BumpServerTLS(LeafCache(CertificateAuthority(certificate, key), 10, clock))


@pytest.fixture
def bump_port(server):
    connections: list[BumpedClientConnection] = []

    def make() -> BumpedClientConnection:
        connection = BumpedClientConnection(server, "shop.example")
        connections.append(connection)
        return connection

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(make), interface="127.0.0.1")
    yield port.getHost().port, connections
    wait(defer.maybeDeferred(port.stopListening))


def trust_of(tmp_path, pem: bytes) -> OriginTrust:
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(pem)
    return OriginTrust(load_trust_root(str(bundle)))


def test_a_client_trusting_the_ca_is_bumped_and_speaks_http_inside(server, bump_port, tmp_path):
    port, connections = bump_port
    trust = trust_of(tmp_path, server.leaves.ca.certificate.public_bytes(Encoding.PEM))
    client = OriginTLS(trust.creator("shop.example"), reactor, 10)
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: client))
    verdict = wait(client.verdict)
    assert verdict.ok and verdict.alpn == b"http/1.1"
    fetch = Fetch()
    client.attach(fetch)
    assert wait(fetch.got).endswith(b"bumped\n")
    assert connections[0].requests.startswith(b"GET / HTTP/1.1\r\n")
    assert "shop.example" in server.leaves
    client.transport.loseConnection()
    wait(connections[0].lost)


def test_a_client_without_the_ca_refuses_and_the_refusal_is_recognised(server, bump_port, tmp_path):
    port, connections = bump_port
    trust = trust_of(tmp_path, make_ca("not the proxy's CA").cert_pem)
    client = OriginTLS(trust.creator("shop.example"), reactor, 10)
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: client))
    assert wait(client.verdict).result == "unknown_issuer"
    (reason,) = wait(connections[0].lost)
    assert client_rejected_certificate(reason.value)
    assert connections[0].requests == b""
