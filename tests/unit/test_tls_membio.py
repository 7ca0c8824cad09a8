"""
L{MemoryTLS}: one TLS connection driven over memory BIOs on a TCP
transport.  Here both ends are L{MemoryTLS} over fake transports (no
sockets, no reactor): the client as the bump's origin side makes it
(L{client_tls} with L{OriginTrust}'s creator: SNI, service_identity), the
server as the bump's client side does (L{BumpServerTLS.start}, the leaf
forged for the name).  The test moves the bytes each end wrote to the
other, whole, split at every byte boundary, or in chunks hypothesis picks.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tproxy_twist.testing import FakeTransport
from tproxy_twist.tls import membio
from tproxy_twist.tls.ca import CertificateAuthority, create_ca
from tproxy_twist.tls.leaf import BumpServerTLS, LeafCache
from tproxy_twist.tls.membio import MemoryTLS, client_tls
from tproxy_twist.tls.testing import now_utc
from tproxy_twist.tls.verify import OriginTrust, trustRootFromCertificates

NAME = "shop.example"


class App:
    """The protocol on the decrypted side: records everything."""

    def __init__(self) -> None:
        self.transport = None
        self.data = b""
        self.handshakes = 0
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        assert self.lost is None
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        assert self.lost is None, "connectionLost twice"
        self.lost = reason


class TCP(FakeTransport):
    """A fake TCP transport that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


@pytest.fixture(autouse=True, params=["private pyOpenSSL API", "public pyOpenSSL API"])
def api(request, monkeypatch) -> str:
    """Every test twice: the fast path, and what runs where pyOpenSSL's internals moved."""
    if request.param.startswith("public"):
        monkeypatch.setattr(membio, "EXACT_PENDING", False)
        names = ("pending_in", "pending_out", "recv", "send", "bio_write", "bio_read")
        for name in (*names, "handshake_step"):
            monkeypatch.setattr(membio, f"_{name}", getattr(membio, f"_portable_{name}"))
    return request.param


@pytest.fixture(scope="module")
def server_tls() -> BumpServerTLS:
    key, certificate = create_ca("membio test CA", now_utc())
    clock = Clock()
    clock.advance(now_utc().timestamp())
    return BumpServerTLS(LeafCache(CertificateAuthority(certificate, key), 10, clock))


@pytest.fixture(scope="module")
def trust(server_tls) -> OriginTrust:
    pem = server_tls.leaves.ca.certificate.public_bytes(Encoding.PEM)
    return OriginTrust(trustRootFromCertificates([Certificate.loadPEM(pem)]))


class Pair:
    """A client end and a server end, each on its fake TCP transport."""

    def __init__(self, trust: OriginTrust, server: BumpServerTLS, name: str = NAME) -> None:
        self.client_app, self.server_app = App(), App()
        self.client_tcp, self.server_tcp = TCP(), TCP()
        self.client = client_tls(self.client_tcp, self.client_app, trust.creator(name))
        self.server_tcp.protocol = self.server_app
        self._server = server
        self.server: MemoryTLS | None = None

    def to_server(self, chunks=None) -> bytes:
        """Move what the client wrote to the server (in C{chunks} sizes, cycled)."""
        data = self.client_tcp.take()
        if self.server is None:
            # The server starts with whatever the TLS layer had read: here, nothing yet.
            self.server = self._server.start(self.server_tcp, NAME, b"")
        feed(self.server, data, chunks)
        return data

    def to_client(self, chunks=None) -> bytes:
        data = self.server_tcp.take()
        feed(self.client, data, chunks)
        return data

    def handshake(self, chunks=None) -> None:
        for _ in range(10):
            moved = self.to_server(chunks) + self.to_client(chunks)
            if not moved:
                break

    def lose_tcp(self, end: MemoryTLS, reason=ConnectionDone) -> None:
        end.connectionLost(Failure(reason()))


def feed(end: MemoryTLS, data: bytes, chunks=None) -> None:
    if not data:
        return
    if not chunks:
        end.dataReceived(data)
        return
    i = 0
    k = 0
    while i < len(data):
        n = max(1, chunks[k % len(chunks)])
        end.dataReceived(data[i : i + n])
        i += n
        k += 1


@pytest.fixture
def pair(trust, server_tls) -> Pair:
    p = Pair(trust, server_tls)
    p.handshake()
    return p


# --- the handshake ------------------------------------------------------------------------


def test_the_handshake_completes_over_memory_and_data_flows_both_ways(pair):
    assert pair.client_app.handshakes == pair.server_app.handshakes == 1
    assert pair.client.handshake_done and pair.server.handshake_done
    assert pair.client_app.transport is pair.client and pair.server_app.transport is pair.server
    assert pair.client_tcp.protocol is pair.client and pair.server_tcp.protocol is pair.server
    pair.client.write(b"GET / HTTP/1.1\r\n\r\n")
    wire = pair.to_server()
    assert b"GET" not in wire  # encrypted
    assert pair.server_app.data == b"GET / HTTP/1.1\r\n\r\n"
    pair.server.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n"])
    pair.to_client()
    assert pair.client_app.data == b"HTTP/1.1 200 OK\r\n\r\n"


def test_the_client_is_verified_against_the_name_and_sees_the_leaf(pair):
    leaf = pair.client.getPeerCertificate().to_cryptography()
    assert NAME in leaf.subject.rfc4514_string()
    assert pair.client.getHandle() is pair.client.connection


def test_a_server_naming_another_host_fails_verification_and_the_client_closes(trust, server_tls):
    p = Pair(trust, server_tls, name="elsewhere.example")
    p.handshake()
    assert p.client_app.handshakes == 0
    assert p.client_tcp.disconnecting  # closed after the alert, not aborted silently
    p.lose_tcp(p.client)
    # The SNI was not the name the server forges for: no certificate, a failed handshake.
    assert p.client_app.lost.check(SSL.Error)


def test_a_certificate_for_another_name_fails_the_clients_name_check(trust, server_tls):
    # An IP address is verified but not sent as SNI: the server forges for NAME.
    p = Pair(trust, server_tls, name="192.0.2.7")
    p.handshake()
    assert p.client_app.handshakes == 0 and p.client_tcp.disconnecting
    p.lose_tcp(p.client)
    from service_identity import VerificationError

    assert p.client_app.lost.check(VerificationError)  # Twisted's service_identity check


def test_writes_before_the_handshake_wait_and_go_after_it(trust, server_tls):
    p = Pair(trust, server_tls)
    p.client.write(b"early ")
    p.client.writeSequence([b"bird"])
    assert p.client_app.handshakes == 0
    p.handshake()
    assert p.server_app.data == b"early bird"


def test_every_split_of_the_handshake_bytes_still_completes(trust, server_tls):
    # One byte at a time: every record (and every record header) split everywhere.
    p = Pair(trust, server_tls)
    p.handshake(chunks=[1])
    assert p.client_app.handshakes == p.server_app.handshakes == 1
    p.client.write(b"ping")
    p.to_server(chunks=[1])
    assert p.server_app.data == b"ping"


def test_a_tls13_servers_session_tickets_go_with_its_first_write_in_one_send(trust, server_tls):
    p = Pair(trust, server_tls)
    p.handshake()
    assert p.server.handshake_done and p.client.handshake_done
    # The server's first flight, then nothing: the tickets wait for the first write.
    assert p.server_tcp.writes == 1
    p.client.write(b"GET / HTTP/1.1\r\n\r\n")
    p.to_server()
    assert p.server_tcp.writes == 1  # reading the request sent nothing either
    p.server.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert p.server_tcp.writes == 2
    wire = p.to_client()
    # The response's record (19 bytes + 22 of header and tag) and the two tickets.
    assert len(wire) > 19 + 22 + 2 * 100
    assert p.client_app.data == b"HTTP/1.1 200 OK\r\n\r\n"
    p.server.write(b"more")
    assert len(p.to_client()) == 4 + 22  # nothing held any more


def test_held_session_tickets_go_before_the_close_notify(trust, server_tls):
    p = Pair(trust, server_tls)
    p.handshake()
    p.server.loseConnection()
    assert p.server_tcp.writes == 2
    p.to_client()
    assert p.client_tcp.disconnecting  # the close_notify was read (and answered)


class _TLS12Creator:
    """A client connection that speaks TLS 1.2 at most (no verification: not the point)."""

    def clientConnectionForTLS(self, protocol):
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        connection = SSL.Connection(context, None)
        connection.set_tlsext_host_name(NAME.encode())
        return connection


def test_a_tls12_servers_finished_is_sent_at_once(server_tls):
    client_app, client_tcp, server_tcp = App(), TCP(), TCP()
    client = client_tls(client_tcp, client_app, _TLS12Creator())
    server_tcp.protocol = App()
    server = server_tls.start(server_tcp, NAME, client_tcp.take())
    for _ in range(5):  # the client waits for the server's Finished, which is not held
        feed(client, server_tcp.take())
        feed(server, client_tcp.take())
    assert client.handshake_done and server.handshake_done
    assert client_app.handshakes == 1


# --- records -------------------------------------------------------------------------------


def test_a_record_split_at_every_byte_boundary_arrives_whole_in_order(pair):
    expected = b""
    for i in range(1, 60):
        message = b"%03d:" % i + b"x" * 40
        pair.client.write(message)
        wire = pair.client_tcp.take()
        assert 0 < i < len(wire)
        pair.server.dataReceived(wire[:i])
        pair.server.dataReceived(wire[i:])
        expected += message
        assert pair.server_app.data == expected


def test_many_records_in_one_read_are_delivered_in_one_call(pair):
    calls = []
    pair.server_app.dataReceived = calls.append
    for i in range(5):
        pair.client.write(b"record %d;" % i)
    pair.to_server()
    assert calls == [b"record 0;record 1;record 2;record 3;record 4;"]


def test_a_large_write_is_encrypted_in_records_and_sent_in_one_write(pair):
    body = bytes(range(256)) * 1024  # 256 KiB: 16 records
    before = pair.client_tcp.writes
    pair.client.write(body)
    assert pair.client_tcp.writes == before + 1
    wire = pair.client_tcp.take()
    assert len(wire) > len(body)
    feed(pair.server, wire, chunks=[4000])
    assert pair.server_app.data == body


def test_whole_records_partial_records_and_several_at_once_each_arrive_when_complete(pair):
    wires = []
    for i in range(4):
        pair.client.write(b"record %d;" % i)
        wires.append(pair.client_tcp.take())
    calls = []
    pair.server_app.dataReceived = calls.append
    pair.server.dataReceived(wires[0])  # one whole record
    pair.server.dataReceived(wires[1] + wires[2][:7])  # a whole one and part of the next
    pair.server.dataReceived(wires[2][7:])  # the rest of it: on its own, not a whole record
    pair.server.dataReceived(wires[3])
    assert calls == [b"record 0;", b"record 1;", b"record 2;", b"record 3;"]


def test_decrypted_bytes_go_where_deliver_to_says_and_other_events_to_the_protocol(pair):
    received = []
    pair.server.deliver_to(received.append)
    pair.client.write(b"one")
    pair.to_server()
    pair.client.write(b"two")
    pair.client.write(b"three")
    pair.to_server()  # two records in one read: the other path
    assert received == [b"one", b"twothree"] and pair.server_app.data == b""
    pair.client.loseConnection()
    pair.to_server()
    pair.lose_tcp(pair.server)
    assert pair.server_app.lost.check(ConnectionDone)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=8),
    messages=st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=6),
)
def test_any_chunking_of_the_whole_conversation_delivers_the_same_bytes(
    trust, server_tls, chunks, messages
):
    p = Pair(trust, server_tls)
    p.client.write(messages[0])  # during the handshake
    p.handshake(chunks)
    for m in messages[1:]:
        p.client.write(m)
        p.server.write(m[::-1])
        p.to_server(chunks)
        p.to_client(chunks)
    assert p.server_app.data == b"".join(messages)
    assert p.client_app.data == b"".join(m[::-1] for m in messages[1:])


# --- closing -------------------------------------------------------------------------------


def test_lose_connection_sends_close_notify_after_the_data_and_the_peer_answers(pair):
    pair.client.write(b"last words")
    pair.client.loseConnection()
    assert pair.client_tcp.disconnecting  # the TCP connection closes after close_notify
    pair.to_server()
    assert pair.server_app.data == b"last words"
    # The server answered with its close_notify and closes too.
    assert pair.server_tcp.disconnecting
    assert pair.server_tcp.value() != b""
    pair.to_client()
    pair.lose_tcp(pair.server)
    pair.lose_tcp(pair.client)
    assert pair.server_app.lost.check(ConnectionDone)
    assert pair.client_app.lost.check(ConnectionDone)


def test_writes_after_lose_connection_are_dropped(pair):
    pair.server.loseConnection()
    pair.server_tcp.clear()
    pair.server.write(b"too late")
    assert pair.server_tcp.value() == b""


def test_a_peer_that_closes_tcp_without_close_notify_is_a_lost_connection(pair):
    pair.client.write(b"partial")
    pair.to_server()
    pair.lose_tcp(pair.server)
    assert pair.server_app.data == b"partial"
    assert pair.server_app.lost.check(ConnectionLost)


def test_data_that_came_with_the_tcp_close_is_delivered_before_connection_lost(pair):
    pair.client.write(b"tail")
    pair.client.loseConnection()
    pair.server.dataReceived(pair.client_tcp.take())
    pair.lose_tcp(pair.server)
    assert pair.server_app.data == b"tail" and pair.server_app.lost is not None


def test_garbage_from_the_peer_gets_an_alert_and_a_close(pair):
    pair.server_tcp.clear()
    pair.server.dataReceived(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)  # an unauthentic record
    alert_record = pair.server_tcp.value()
    assert alert_record[:1] == b"\x15" or alert_record[:1] == b"\x17"  # an alert (maybe wrapped)
    assert pair.server_tcp.disconnecting
    pair.lose_tcp(pair.server)
    assert pair.server_app.lost.check(SSL.Error)
    assert pair.server_app.data == b""


def test_garbage_instead_of_a_client_hello_fails_the_handshake_with_an_alert(trust, server_tls):
    transport = FakeTransport()
    app = App()
    transport.protocol = app
    end = server_tls.start(transport, NAME, b"\x16\x03\x01\x00\x05hello")
    assert transport.value()[:1] == b"\x15" and transport.disconnecting
    end.connectionLost(Failure(ConnectionDone()))
    assert app.handshakes == 0 and app.lost.check(SSL.Error)


def test_lose_connection_during_the_handshake_aborts(trust, server_tls):
    p = Pair(trust, server_tls)
    p.client.loseConnection()
    assert p.client_tcp.disconnecting  # FakeTransport.abortConnection closes it


def test_after_an_abort_nothing_more_is_delivered(pair):
    pair.client.write(b"not seen")
    pair.server.abortConnection()
    pair.to_server()
    assert pair.server_app.data == b""
    pair.lose_tcp(pair.server, ConnectionLost)
    assert pair.server_app.lost.check(ConnectionLost)


# --- the transport interface -----------------------------------------------------------------


def test_a_producer_waits_for_unregistering_before_close_notify(pair):
    producer = Producer()
    pair.server.registerProducer(producer, True)
    assert pair.server.producer is producer
    assert pair.server_tcp.producer is producer  # a fake: registered at once
    pair.server.loseConnection()
    assert not pair.server_tcp.disconnecting
    pair.server.write(b"still produced")
    pair.server.unregisterProducer()
    assert pair.server_tcp.producer is None and pair.server_tcp.disconnecting
    pair.to_client()
    assert pair.client_app.data == b"still produced"


def test_a_second_producer_is_refused(pair):
    pair.server.registerProducer(Producer(), True)
    with pytest.raises(RuntimeError):
        pair.server.registerProducer(Producer(), True)


def test_pausing_and_resuming_reach_the_tcp_transport(pair):
    pair.server.pauseProducing()
    assert pair.server_tcp.producerState == "paused"
    pair.server.resumeProducing()
    assert pair.server_tcp.producerState == "producing"
    pair.server.bufferSize = 1 << 18
    assert pair.server_tcp.bufferSize == 1 << 18 == pair.server.bufferSize
