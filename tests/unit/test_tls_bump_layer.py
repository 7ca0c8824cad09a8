"""
The TLS layer's bump path on fake transports and a fake clock: which
connections are bumped and which spliced instead, the order (the origin is
verified before the client gets anything), what happens when verification
fails, and the decrypted HTTP through the relay's session (https URLs, the
Host checked against the SNI, errors answered inside the connection).

TLS itself is not run here (the fake transports record C{startTLS}); the
real handshakes are in test_tls_bump_server.py, test_tls_verify.py and the
e2e test_tls_bump.py.
"""

from __future__ import annotations

import itertools
import json

import attrs
import pytest
from OpenSSL import SSL
from prometheus_client import REGISTRY
from twisted.internet import error as neterror
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tproxy_twist import config as C
from tproxy_twist.http import policy
from tproxy_twist.http.framing import ProtocolError
from tproxy_twist.metrics import BumpMetrics, PortMetrics, TLSPortMetrics
from tproxy_twist.testing import (
    FakeConnect,
    FakeTransport,
    alpn_extension,
    hello_message,
    records,
    sni_extension,
    tcp_address,
)
from tproxy_twist.tls.bump import BumpedClient, OriginAttempt
from tproxy_twist.tls.bumpkit import BumpKit
from tproxy_twist.tls.layer import BUMPED, CLOSED, CONNECTING, HANDSHAKING, RELAYING, TLSFactory
from tproxy_twist.tls.pinning import PinnedHosts
from tproxy_twist.tls.testing import make_ca
from tproxy_twist.tls.verify import OriginTLS, OriginTrust, trustRootFromCertificates

CLIENT = ("198.51.100.2", 40001)
ORIGIN = ("203.0.113.2", 443)
SNI = "www.example.org"
HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"
_names = itertools.count()


def hello(sni: bytes | None = SNI.encode(), alpn=(b"h2", b"http/1.1")) -> bytes:
    extensions = [sni_extension(sni)] if sni is not None else []
    if alpn:
        extensions.append(alpn_extension(list(alpn)))
    return records(hello_message(extensions))


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class TLSTransport(FakeTransport):
    """A fake TCP transport that records C{startTLS} (the bytes stay plain)."""

    def __init__(self, host=None, peer=None) -> None:
        super().__init__(host, peer)
        self.started_tls = None

    def startTLS(self, creator, normal=True) -> None:
        self.started_tls = creator


class FakeServer:
    """Stands in for L{BumpServerTLS}: records what the client side was started with."""

    def __init__(self) -> None:
        self.started: list[tuple[object, str, bytes]] = []

    def start(self, transport, name: str, hello: bytes = b"") -> None:
        self.started.append((transport, name, hello))


@pytest.fixture(scope="module")
def origins() -> OriginTrust:
    from twisted.internet.ssl import Certificate

    ca = make_ca("bump layer test CA")
    return OriginTrust(trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem)]))


class Harness:
    """One client connection to a bumping TLS port."""

    def __init__(
        self,
        origins: OriginTrust,
        *,
        on_verify_failure: str = "splice",
        pinned_after: int = 0,
        extra: str = "",
        sni: bytes | None = SNI.encode(),
        top: str = "",
    ) -> None:
        self.name = f"bump{next(_names)}"
        text = top + (
            f'[[port]]\nname = "{self.name}"\nlisten = "[::]:3130"\nmode = "tproxy"\n'
            f'protocol = "tls"\n{extra}[port.tls]\ndefault = "bump"\n'
        )
        config = C.loads(text)
        self.port = config.ports[0]
        self.clock = Clock()
        self.connect = FakeConnect()
        self.server = FakeServer()
        self.kit = BumpKit(
            ca=None,
            leaves=None,
            server=self.server,
            origins=origins,
            pinned=PinnedHosts(pinned_after),
            on_verify_failure=on_verify_failure,
        )
        self.entries = []
        self.factory = TLSFactory(
            self.port,
            timeouts=config.timeouts,
            connect=self.connect,
            clock=self.clock,
            local_addresses=frozenset({"198.51.100.1", "203.0.113.1"}),
            metrics=PortMetrics(self.name, "tproxy"),
            tls_metrics=TLSPortMetrics(self.name),
            access_log=self,
            bump=self.kit,
            bump_metrics=BumpMetrics(self.name),
            limits=config.limits,
        )
        self.new_connection()

    def new_connection(self) -> None:
        """Another client connection to the same port (the last one is forgotten)."""
        self.protocol = self.factory.buildProtocol(None)
        self.transport = TLSTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
        self.protocol.makeConnection(self.transport)

    def log(self, entry) -> None:
        self.entries.append(entry)

    def origin_connected(self, attempt=None) -> tuple[OriginTLS, TLSTransport]:
        """The TCP connection of an origin attempt is made: TLS starts on it."""
        attempt = attempt or self.connect.last
        assert isinstance(attempt.factory, OriginAttempt)
        origin = attempt.factory.buildProtocol(tcp_address(attempt.host, attempt.port))
        transport = TLSTransport(host=tcp_address(attempt.source_ip, 40000),
                                 peer=tcp_address(attempt.host, attempt.port))  # fmt: skip
        origin.makeConnection(transport)
        return origin, transport

    def verified(self) -> tuple[OriginTLS, TLSTransport]:
        """The origin's handshake completes and its certificate is good."""
        origin, transport = self.origin_connected()
        origin.handshakeCompleted()  # no OpenSSL connection: no ALPN, verdict ok
        return origin, transport

    def failed_verification(self, code: int) -> None:
        origin, transport = self.origin_connected()
        origin._tls = FakeVerifyResult(code)
        transport.disconnected = True
        origin.connectionLost(
            Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        )

    def bumped(self) -> tuple[OriginTLS, TLSTransport]:
        """Hello, verified origin, client handshake done: HTTP from here on."""
        self.protocol.dataReceived(hello())
        origin, transport = self.verified()
        self.protocol.handshakeCompleted()
        assert self.protocol.state == BUMPED
        return origin, transport

    def advance(self, seconds: float) -> None:
        """Time passes, the factory's sweep looking at the deadlines every 0.25 s."""
        for _ in range(round(seconds / 0.25)):
            self.clock.advance(0.25)

    def tls(self, what: str, value: str) -> float:
        self.factory.tls_metrics.flush()
        name = "tproxy_tls_connections_total" if what == "action" else "tproxy_tls_rejected_total"
        return sample(name, port=self.name, **{what: value})

    def verify_count(self, result: str) -> float:
        return sample("tproxy_tls_origin_verify_total", port=self.name, result=result)


@attrs.define
class FakeVerifyResult:
    """An OpenSSL connection whose only answer is its verify result (for classify_failure)."""

    code: int
    _ssl: object = None


@pytest.fixture(autouse=True)
def verify_result(monkeypatch):
    # classify_failure asks OpenSSL for SSL_get_verify_result(connection._ssl).
    from tproxy_twist.tls import verify

    monkeypatch.setattr(
        verify, "_verify_result", lambda c: c.code if isinstance(c, FakeVerifyResult) else None
    )


# --- which connections are bumped --------------------------------------------------------


def test_the_origin_is_verified_for_the_sni_before_the_client_gets_anything(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    attempt = h.connect.last
    assert (attempt.host, attempt.port, attempt.source_ip) == ("203.0.113.2", 443, "198.51.100.2")
    assert isinstance(attempt.factory, OriginAttempt)
    origin, transport = h.origin_connected()
    assert transport.started_tls is not None  # TLS with the SNI as server name
    assert h.server.started == [] and h.transport.value() == b""
    origin.handshakeCompleted()
    assert h.server.started == [(h.transport, SNI, hello())]  # the hello replayed into TLS
    assert h.protocol.state == HANDSHAKING
    assert h.tls("action", "bump") == 1 and h.verify_count("ok") == 1


def test_a_hello_without_sni_is_bumped_for_the_original_destination_address(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello(sni=None))
    h.verified()
    assert h.server.started[0][1] == "203.0.113.2"


def test_a_client_offering_h2_without_http11_is_spliced(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello(alpn=(b"h2",)))
    assert not isinstance(h.connect.last.factory, OriginAttempt)
    upstream = h.connect.last.succeed()
    assert upstream.take() == hello(alpn=(b"h2",))
    assert h.protocol.state == RELAYING
    assert h.tls("action", "splice") == 1 and h.tls("action", "bump") == 0


def test_a_client_offering_no_alpn_at_all_is_bumped(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello(alpn=()))
    assert isinstance(h.connect.last.factory, OriginAttempt)


def test_a_host_whose_clients_keep_refusing_our_certificate_is_spliced(origins):
    h = Harness(origins, pinned_after=2)
    for _ in range(2):
        h.protocol.dataReceived(hello())
        h.verified()
        h.transport.disconnected = True
        h.protocol.connectionLost(
            Failure(SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]))
        )
        h.new_connection()
    assert h.kit.pinned.should_splice(SNI)
    h.protocol.dataReceived(hello())
    assert not isinstance(h.connect.last.factory, OriginAttempt)


# --- origins that fail verification ----------------------------------------------------------


@pytest.mark.parametrize(
    "code, result", [(62, "bad_name"), (18, "unknown_issuer"), (10, "expired")]
)
def test_an_origin_failing_verification_is_spliced_on_a_fresh_connection(origins, code, result):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    first = h.connect.last
    h.failed_verification(code)
    assert h.server.started == []  # never a proxy-signed certificate
    second = h.connect.last
    assert second is not first and not isinstance(second.factory, OriginAttempt)
    assert second.source_ip == "198.51.100.2"
    upstream = second.succeed()
    assert upstream.take() == hello()  # the client gets the origin's own certificate
    assert h.protocol.state == RELAYING
    assert h.verify_count(result) == 1
    assert h.tls("action", "splice") == 1 and h.tls("action", "bump") == 0


def test_with_terminate_an_origin_failing_verification_closes_the_client(origins):
    h = Harness(origins, on_verify_failure="terminate")
    h.protocol.dataReceived(hello())
    first = h.connect.last
    h.failed_verification(18)
    assert h.connect.last is first and h.server.started == []
    assert h.transport.value() == HANDSHAKE_FAILURE
    assert h.transport.write_closed
    assert h.tls("reason", "origin_unverified") == 1 and h.tls("action", "close") == 1


def test_an_origin_that_never_accepts_the_connection_is_given_up_at_the_connect_timeout(
    origins,
):
    h = Harness(origins, top="[timeouts]\nconnect = 5\n")
    h.protocol.dataReceived(hello())
    attempt = h.connect.last
    assert attempt.timeout is None  # the connection's deadline, no timer per attempt
    before = sample("tproxy_upstream_errors_total", port=h.name, reason="timeout")
    h.advance(4.5)
    assert not attempt.stopped and not h.transport.closed
    h.advance(1)
    assert attempt.stopped and h.transport.closed and h.server.started == []
    assert sample("tproxy_upstream_errors_total", port=h.name, reason="timeout") == before + 1
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionLost()))
    assert (h.entries[-1].status, h.entries[-1].action) == (504, "bump")


@pytest.mark.parametrize("on_verify_failure", ["splice", "terminate"])
def test_an_origin_that_does_not_finish_its_handshake_times_out_as_a_failed_verification(
    origins, on_verify_failure
):
    h = Harness(origins, on_verify_failure=on_verify_failure, top="[timeouts]\nconnect = 5\n")
    h.protocol.dataReceived(hello())
    first = h.connect.last
    h.advance(3)
    origin, transport = h.origin_connected()  # TCP made: the handshake gets 5 s of its own
    h.advance(4.5)
    assert not origin.verdict.called and not transport.closed
    h.advance(1)
    assert origin.verdict.called and transport.closed  # aborted: nothing more said to it
    assert h.verify_count("timeout") == 1 and h.server.started == []
    if on_verify_failure == "terminate":
        assert h.connect.last is first and h.transport.value() == HANDSHAKE_FAILURE
        return
    second = h.connect.last
    assert second is not first and not isinstance(second.factory, OriginAttempt)
    assert second.succeed().take() == hello()  # spliced, the hello replayed
    assert h.protocol.state == RELAYING


def test_an_origin_verified_in_time_leaves_no_deadline_of_its_own(origins):
    h = Harness(origins, top="[timeouts]\nconnect = 5\n")
    h.protocol.dataReceived(hello())
    h.advance(3)
    origin, transport = h.origin_connected()
    # No timer armed for the origin's handshake: the sweep's deadline is the only one.
    assert [c for c in h.clock.getDelayedCalls() if c.func == origin.time_out] == []
    origin.handshakeCompleted()
    h.advance(4)  # past the first connection's TCP + 5 s: its deadline was replaced
    assert h.verify_count("ok") == 1 and h.verify_count("timeout") == 0
    assert h.protocol.state == HANDSHAKING


def test_an_unreachable_origin_resets_the_client(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    h.connect.last.fail(neterror.ConnectionRefusedError())
    assert h.transport.disconnected or h.transport.disconnecting
    assert h.server.started == []
    assert h.tls("action", "bump") == 1


def test_a_client_leaving_during_verification_aborts_the_origin(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    origin, transport = h.origin_connected()
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    assert transport.disconnecting or transport.disconnected
    assert h.protocol.state == CLOSED


# --- the client's handshake ---------------------------------------------------------------------


def test_a_client_refusing_our_certificate_is_counted_and_the_origin_closed(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    _, origin_transport = h.verified()
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])))
    assert sample("tproxy_tls_client_cert_rejected_total", port=h.name) == 1
    assert origin_transport.disconnecting or origin_transport.disconnected


def test_a_client_handshake_failing_otherwise_is_not_counted_as_a_refusal(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    h.verified()
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionLost()))
    assert sample("tproxy_tls_client_cert_rejected_total", port=h.name) == 0


def test_a_client_that_does_not_finish_its_handshake_is_closed(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    h.verified()
    for _ in range(30):
        h.clock.advance(0.25)
    assert h.transport.disconnecting or h.transport.disconnected


# --- the decrypted HTTP ---------------------------------------------------------------------------


def test_requests_go_over_the_verified_origin_and_are_logged_as_https(origins):
    h = Harness(origins)
    origin, origin_transport = h.bumped()
    assert isinstance(h.protocol.http, BumpedClient)
    h.protocol.dataReceived(b"GET /a?b HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    assert len(h.connect.attempts) == 1  # no second connection: the verified one is used
    sent = origin_transport.take()
    assert sent.startswith(b"GET /a?b HTTP/1.1\r\n") and b"Host: www.example.org" in sent
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert h.transport.value().endswith(b"\r\n\r\nok")
    (entry,) = h.entries
    assert (entry.url, entry.status, entry.method) == ("https://www.example.org/a?b", 200, "GET")
    assert entry.client == "198.51.100.2"


class DeliveringTransport(TLSTransport):
    """A TLS transport that, as MemoryTLS, can hand the decrypted bytes elsewhere."""

    receive = None

    def deliver_to(self, receive) -> None:
        self.receive = receive


def test_a_bumped_clients_decrypted_bytes_go_straight_to_its_http_relay(origins):
    h = Harness(origins)
    h.transport = DeliveringTransport(host=h.transport.getHost(), peer=h.transport.getPeer())
    h.protocol = h.factory.buildProtocol(None)
    h.protocol.makeConnection(h.transport)
    origin, origin_transport = h.bumped()
    assert h.transport.receive == h.protocol.http.dataReceived
    h.transport.receive(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    assert origin_transport.take().startswith(b"GET / HTTP/1.1\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.transport.value().endswith(b"\r\n\r\nok")


def test_a_host_naming_another_server_than_the_sni_is_misdirected_when_strict(origins):
    h = Harness(origins, extra="host_verify_strict = true\n")
    h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert h.transport.value().startswith(b"HTTP/1.1 421 ")


def test_a_host_naming_another_server_is_relayed_but_counted_when_not_strict(origins):
    h = Harness(origins)
    _, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert b"Host: other.example" in origin_transport.take()


def test_a_further_upstream_connection_is_verified_too(origins):
    h = Harness(origins)
    origin, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    origin_transport.disconnected = True
    origin.connectionLost(Failure(neterror.ConnectionDone()))
    h.transport.clear()
    h.protocol.dataReceived(b"GET /2 HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    attempt = h.connect.last
    assert len(h.connect.attempts) == 2 and isinstance(attempt.factory, OriginAttempt)
    assert attempt.source_ip == "198.51.100.2"
    h.failed_verification(18)
    assert h.transport.value().startswith(b"HTTP/1.1 502 ")  # inside the client's TLS
    assert h.verify_count("unknown_issuer") == 1


def test_the_proxys_own_errors_are_written_through_the_tls_transport(origins):
    h = Harness(origins)
    origin, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    origin_transport.disconnected = True
    origin.connectionLost(Failure(neterror.ConnectionLost()))
    assert h.transport.value().startswith(b"HTTP/1.1 502 ")


def test_closing_the_bumped_connection_ends_the_session(origins):
    h = Harness(origins)
    h.bumped()
    session = h.protocol.http.session
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    assert h.protocol.http not in h.factory.http.connections
    assert session.state != CONNECTING and h.factory.connections == set()


# --- the Host rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "named, server, agrees",
    [
        (b"www.example.org", "www.example.org", True),
        (b"WWW.Example.Org.", "www.example.org", True),
        (b"www.example.org:443", "www.example.org", True),
        (b"www.example.org:8443", "www.example.org", False),
        (b"example.org", "www.example.org", False),
        (b"203.0.113.2", "www.example.org", True),  # the destination itself
        (b"203.0.113.9", "www.example.org", False),
        (b"203.0.113.2", "203.0.113.2", True),
    ],
)
def test_on_a_bumped_connection_the_host_must_name_the_verified_server(named, server, agrees):
    assert policy.host_names_server(named, server, ORIGIN) is agrees


def test_an_invalid_host_on_a_bumped_connection_is_a_bad_request():
    with pytest.raises(ProtocolError):
        policy.host_names_server(b"a b", "www.example.org", ORIGIN)


def test_draining_closes_an_idle_bumped_connection_and_lets_a_busy_one_finish(origins):
    h = Harness(origins)
    origin, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    assert h.factory.drain(min_idle=0) == 1
    assert not h.transport.closed  # its response is still to come
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.transport.value().endswith(b"ok")
    assert b"Connection: close" in h.transport.value()
    h.factory.drain(min_idle=0)
    assert h.transport.closed


# --- the connection's own access-log line -----------------------------------------------------


def test_a_bumped_connection_gets_a_connect_line_after_its_request_lines(origins):
    h = Harness(origins)
    origin, _ = h.bumped()
    h.protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.clock.advance(1.5)
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    request, connection = h.entries
    assert request.url == "https://www.example.org/a" and request.sni is None
    assert (connection.method, connection.url, connection.result, connection.status) == (
        "CONNECT", "www.example.org:443", "NONE", 200,
    )  # fmt: skip
    assert (connection.action, connection.sni, connection.alpn) == ("bump", SNI, "h2,http/1.1")
    assert connection.destination == "203.0.113.2:443" and connection.duration == 1.5
    # Its bytes are its requests' (decrypted), not counted twice in the metrics.
    assert (connection.bytes_in, connection.bytes_out) == (request.bytes_in, request.bytes_out)
    assert connection.bytes_out > 0


def test_a_bumped_connection_line_in_both_formats(origins):
    from tproxy_twist.accesslog import JSONFormatter, SquidFormatter

    h = Harness(origins)
    h.bumped()
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    (entry,) = h.entries
    squid = SquidFormatter()(entry).split()
    assert squid[3:] == ["NONE/200", "0", "CONNECT", "www.example.org:443", "-",
                         "HIER_DIRECT/203.0.113.2", "-"]  # fmt: skip
    fields = json.loads(JSONFormatter()(entry))
    assert (fields["action"], fields["sni"], fields["method"]) == ("bump", SNI, "CONNECT")
    assert "tls_version" in fields and "ech" in fields


def test_a_connection_spliced_after_failed_verification_is_logged_as_a_splice(origins):
    h = Harness(origins)
    h.protocol.dataReceived(hello())
    h.failed_verification(18)
    h.connect.last.succeed()
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    (entry,) = h.entries
    assert (entry.result, entry.action, entry.status) == ("TCP_TUNNEL", "splice", 200)


# --- destination rules ------------------------------------------------------------------------


def test_a_bump_to_a_refused_destination_is_denied_before_any_origin_connection(origins):
    h = Harness(origins, extra='deny_destinations = ["203.0.113.2"]\n')
    h.protocol.dataReceived(hello())
    assert h.connect.attempts == [] and h.server.started == []
    assert h.transport.value() == b"\x15\x03\x03\x00\x02\x02\x31"  # access_denied
    assert sample("tproxy_rejected_total", port=h.name, reason="destination") == 1
    h.transport.disconnected = True
    h.protocol.connectionLost(Failure(neterror.ConnectionDone()))
    (entry,) = h.entries
    assert (entry.result, entry.status, entry.action) == ("TCP_DENIED", 403, "deny")


def test_a_bumped_requests_host_never_steers_the_upstream_connection(origins):
    h = Harness(origins)
    origin, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET http://192.0.2.9:8080/x HTTP/1.1\r\nHost: 192.0.2.9\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    sent = origin_transport.take()
    assert sent.count(b"GET ") == 2  # both over the verified origin connection
    assert len(h.connect.attempts) == 1  # and no other connection was made


def test_a_further_upstream_connection_is_checked_against_the_destination_rules(origins):
    from tproxy_twist.destinations import DestinationPolicy, DestinationRule

    h = Harness(origins)
    origin, origin_transport = h.bumped()
    h.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    origin_transport.disconnected = True
    origin.connectionLost(Failure(neterror.ConnectionDone()))
    # The rules now refuse the destination (the first connection was made before).
    rule = DestinationRule(allow=False, network=None, ports=((443, 443),), text="*:443")
    h.factory.port = attrs.evolve(h.port, destinations=DestinationPolicy(deny=(rule,)))
    h.transport.clear()
    h.protocol.dataReceived(b"GET /2 HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
    assert len(h.connect.attempts) == 1
    answer = h.transport.value()
    assert answer.startswith(b"HTTP/1.1 403 ") and b"deny_destinations '*:443'" in answer
    assert sample("tproxy_rejected_total", port=h.name, reason="destination") == 1
