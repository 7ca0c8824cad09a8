"""
Origin verification before a bump: real TLS handshakes over loopback
sockets against local origins whose certificates come from a test CA.
The reactor is iterated until the event a test waits for has happened.
"""

from __future__ import annotations

import datetime
import gc
from pathlib import Path

import pytest
from OpenSSL import crypto
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tproxy_twist.metrics import ORIGIN_VERIFY_RESULTS
from tproxy_twist.tls.testing import Issued, make_ca, make_server_cert, now_utc
from tproxy_twist.tls.testing import wait_for as wait
from tproxy_twist.tls.verify import (
    VERIFY_RESULTS,
    OriginTLS,
    OriginTrust,
    OriginVerdict,
    TrustError,
    classify_failure,
    load_trust_root,
)

ORIGIN = "origin.example"


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Silent(protocol.Protocol):
    def __init__(self, lost: defer.Deferred) -> None:
        self.lost = lost

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class EchoUntilCut(protocol.Protocol):
    """Echoes; on C{cut} closes TCP without close_notify (as nginx after its keep-alive timeout)."""

    def dataReceived(self, data: bytes) -> None:
        if data == b"cut":
            self.transport.abortConnection()
        else:
            self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.got = defer.Deferred()
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.got.called:
            self.got.callback(self.data)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture(scope="module")
def test_ca() -> Issued:
    return make_ca("verify test CA")


@pytest.fixture(params=["shared context", "context per connection"])
def trust(request, test_ca, tmp_path: Path) -> OriginTrust:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(make_ca("unrelated CA").cert_pem + test_ca.cert_pem)
    return OriginTrust(
        load_trust_root(str(bundle)), shared_context=request.param == "shared context"
    )


@pytest.fixture
def listen(request):
    """Start a local origin; every port is closed after the test."""
    ports = []

    def start(factory, tls: Issued | None = None, chain=(), alpn=(b"h2", b"http/1.1"),
              tickets=False, groups: bytes | None = None):  # fmt: skip
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            options = CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(tls.key),
                certificate=crypto.X509.from_cryptography(tls.certificate),
                extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
                acceptableProtocols=list(alpn),
                enableSessionTickets=tickets,
            )
            if groups is not None:  # the key exchange groups this origin knows
                from OpenSSL.SSL import _lib

                context = options.getContext()
                assert _lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
            port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        wait(defer.maybeDeferred(port.stopListening))


def _bundle_root(ca: Issued):
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    return trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem)])


def verify(trust: OriginTrust, port: int, name: str = ORIGIN, clock=None, timeout=10.0):
    origin = OriginTLS(trust.creator(name), clock or reactor, timeout)
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: origin))
    return origin, wait(origin.verdict)


def close(origin: OriginTLS) -> None:
    if origin.transport is not None and origin.transport.connected:
        origin.transport.abortConnection()
        for _ in range(5):
            reactor.iterate(0.01)


# --- what the verdicts say ----------------------------------------------------------------


def test_an_origin_with_a_valid_certificate_for_the_sni_is_verified(trust, test_ca, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    origin, verdict = verify(trust, port)
    assert verdict == OriginVerdict("ok", alpn=b"http/1.1")
    close(origin)


def test_an_origin_whose_certificate_names_another_host_fails_with_bad_name(trust, test_ca, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert(["other.example"], test_ca))
    _, verdict = verify(trust, port)
    assert verdict.result == "bad_name"
    assert ORIGIN in verdict.detail


def test_a_self_signed_origin_fails_with_unknown_issuer(trust, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], None))
    _, verdict = verify(trust, port)
    assert verdict.result == "unknown_issuer"
    assert "self-signed" in verdict.detail


def test_an_origin_signed_by_an_untrusted_ca_fails_with_unknown_issuer(trust, listen):
    stranger = make_ca("stranger CA")
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], stranger))
    _, verdict = verify(trust, port)
    assert verdict.result == "unknown_issuer"


def test_an_origin_with_an_expired_certificate_fails_with_expired(trust, test_ca, listen):
    now = now_utc()
    expired = make_server_cert(
        [ORIGIN],
        test_ca,
        not_before=now - datetime.timedelta(days=60),
        not_after=now - datetime.timedelta(days=1),
    )
    port = listen(protocol.Factory.forProtocol(Echo), expired)
    _, verdict = verify(trust, port)
    assert verdict.result == "expired"
    assert "expired" in verdict.detail


def test_an_origin_sending_its_intermediate_is_verified_against_the_root(trust, test_ca, listen):
    intermediate = make_ca("verify intermediate", issuer=test_ca, path_length=0)
    leaf = make_server_cert([ORIGIN], intermediate)
    port = listen(protocol.Factory.forProtocol(Echo), leaf, chain=[intermediate.certificate])
    origin, verdict = verify(trust, port)
    assert verdict.ok
    close(origin)


def test_without_sni_the_origin_must_name_the_ip_address(trust, test_ca, listen):
    good = listen(protocol.Factory.forProtocol(Echo), make_server_cert(["127.0.0.1"], test_ca))
    origin, verdict = verify(trust, good, name="127.0.0.1")
    assert verdict.ok
    close(origin)
    named = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    _, verdict = verify(trust, named, name="127.0.0.1")
    assert verdict.result == "bad_name"


def test_an_origin_that_does_not_speak_tls_fails_the_handshake(trust, listen):
    class Plain(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()

    port = listen(protocol.Factory.forProtocol(Plain))
    _, verdict = verify(trust, port)
    assert verdict.result == "handshake_failed"
    assert verdict.detail


def test_an_origin_that_closes_at_once_fails_the_handshake(trust, listen):
    class Closer(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.loseConnection()

    port = listen(protocol.Factory.forProtocol(Closer))
    _, verdict = verify(trust, port)
    assert verdict.result == "handshake_failed"


def test_a_silent_origin_times_out_and_its_connection_is_aborted(trust, listen):
    lost = defer.Deferred()
    port = listen(protocol.Factory.forProtocol(lambda: Silent(lost)))
    clock = Clock()
    origin = OriginTLS(trust.creator(ORIGIN), clock, 5.0)
    connected = defer.Deferred()
    made = origin.connectionMade

    def connection_made() -> None:
        made()
        connected.callback(None)

    origin.connectionMade = connection_made
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: origin))
    wait(connected)
    clock.advance(4.9)
    assert not origin.verdict.called
    clock.advance(0.2)
    verdict = wait(origin.verdict)
    assert verdict.result == "timeout"
    wait(lost)  # the origin saw the connection go away
    assert not clock.getDelayedCalls()


def test_cancelling_the_verdict_aborts_the_upstream_connection(trust, listen):
    lost = defer.Deferred()
    port = listen(protocol.Factory.forProtocol(lambda: Silent(lost)))
    clock = Clock()
    origin = OriginTLS(trust.creator(ORIGIN), clock, 5.0)
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: origin))
    while origin.transport is None:
        reactor.iterate(0.01)
    origin.verdict.cancel()
    wait(lost)
    assert not clock.getDelayedCalls()
    with pytest.raises(defer.CancelledError):
        wait(origin.verdict)


# --- after the verdict --------------------------------------------------------------------


def test_after_verification_the_attached_protocol_relays_over_tls(trust, test_ca, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    origin, verdict = verify(trust, port)
    assert verdict.ok
    app = Collect()
    origin.attach(app)
    assert app.transport is origin.transport
    app.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    assert wait(app.got) == b"GET / HTTP/1.1\r\n\r\n"
    close(origin)


def test_nothing_can_be_attached_to_an_origin_that_failed(trust, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], None))
    origin, verdict = verify(trust, port)
    assert not verdict.ok
    with pytest.raises(RuntimeError):
        origin.attach(Collect())


# --- the pieces ---------------------------------------------------------------------------


def test_the_verify_results_are_the_metric_label_values():
    assert VERIFY_RESULTS == ORIGIN_VERIFY_RESULTS


def test_a_connection_lost_without_tls_state_is_a_failed_handshake():
    verdict = classify_failure(Failure(ConnectionDone("closed")), None)
    assert verdict.result == "handshake_failed"
    assert "closed" in verdict.detail


def test_a_missing_trust_bundle_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(TrustError, match=r"nothing\.pem: cannot read"):
        load_trust_root(str(tmp_path / "nothing.pem"))


def test_a_trust_bundle_without_certificates_is_an_error_naming_the_file(tmp_path):
    bundle = tmp_path / "empty.pem"
    bundle.write_text("not a certificate\n")
    with pytest.raises(TrustError, match=r"empty\.pem: no PEM certificate"):
        load_trust_root(str(bundle))


# --- resuming sessions of verified origins --------------------------------------------------


def resumed(origin: OriginTLS) -> bool:
    from OpenSSL.SSL import _lib

    return bool(_lib.SSL_session_reused(origin._tls._ssl))


def close_cleanly(origin: OriginTLS) -> None:
    """close_notify, as the relay closes an upstream connection (an abort makes
    OpenSSL mark the connection's session as not resumable)."""
    origin.transport.loseConnection()
    for _ in range(50):
        if not origin.transport.connected:
            break
        reactor.iterate(0.01)


def verified_and_used(trust: OriginTrust, port: int, name: str = ORIGIN):
    """Verify (offering a kept session), then exchange data: (origin, verdict)."""
    origin = OriginTLS(trust.creator(name, ("127.0.0.1", port)), reactor, 10.0)
    once = [origin]  # the factory keeps no reference: the connection can be freed
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(once.pop))
    verdict = wait(origin.verdict)
    if verdict.ok:
        app = Collect()
        origin.attach(app)
        app.transport.write(b"ping")
        wait(app.got)
    return origin, verdict


def test_the_next_connection_to_a_verified_origin_resumes_its_session(trust, test_ca, listen):
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca), tickets=True
    )
    first, verdict = verified_and_used(trust, port)
    assert verdict.ok and not resumed(first)
    assert len(trust.sessions) == (1 if trust.resumes else 0)
    close(first)  # aborted, as the relay does when its client leaves: still resumable
    second, verdict = verified_and_used(trust, port)
    # Only the shared context can resume (the other is the fallback without
    # Twisted's private API: a context, and so a session cache, per connection).
    assert verdict.ok and resumed(second) is trust.resumes
    close_cleanly(second)
    # Another name at the same address is another key: nothing is offered.
    third, verdict = verified_and_used(trust, port, "127.0.0.1")
    assert not verdict.ok and not resumed(third)


def test_an_aborted_connections_session_is_resumed_after_the_connection_is_freed(
    trust, test_ca, listen
):
    # OpenSSL marks the session of a connection freed without close_notify as not
    # resumable; the relay aborts an origin connection whenever its client leaves.
    if not trust.resumes:
        trust = OriginTrust(trust.trust_root)  # the shared context, which resumes
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca), tickets=True
    )
    first, verdict = verified_and_used(trust, port)
    assert verdict.ok
    close(first)
    del first
    gc.collect()  # its SSL freed: where OpenSSL would have marked the session
    second, verdict = verified_and_used(trust, port)
    assert verdict.ok and resumed(second)
    close_cleanly(second)


def test_an_origin_closing_without_close_notify_leaves_its_session_resumable(
    trust, test_ca, listen
):
    if not trust.resumes:
        trust = OriginTrust(trust.trust_root)  # the shared context, which resumes
    port = listen(
        protocol.Factory.forProtocol(EchoUntilCut),
        make_server_cert([ORIGIN], test_ca),
        tickets=True,
    )
    first, verdict = verified_and_used(trust, port)
    app = first._app
    app.transport.write(b"cut")
    wait(app.lost)
    assert app.reason.check(ConnectionLost)  # a truncated stream, as before
    del first, app
    gc.collect()
    second, verdict = verified_and_used(trust, port)
    assert verdict.ok and resumed(second)
    close_cleanly(second)


def test_a_resumed_session_is_still_checked_for_the_name(trust, test_ca, listen):
    if not trust.resumes:
        trust = OriginTrust(trust.trust_root)  # the shared context, which resumes
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca), tickets=True
    )
    first, verdict = verified_and_used(trust, port)
    session = trust.sessions.get(("127.0.0.1", port, ORIGIN))
    close_cleanly(first)
    # Planted under a name the certificate does not carry: the origin resumes
    # it, the name check on the session's certificate still refuses.
    trust.sessions.put(("127.0.0.1", port, "elsewhere.example"), session)
    other, verdict = verified_and_used(trust, port, "elsewhere.example")
    assert verdict.result == "bad_name"
    assert trust.sessions.get(("127.0.0.1", port, "elsewhere.example")) is None  # forgotten


def test_a_kept_session_carries_its_certificates_sha256_and_is_still_checked_for_the_name(
    test_ca, listen
):
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding

    issued = make_server_cert([ORIGIN], test_ca)
    port = listen(protocol.Factory.forProtocol(Echo), issued, tickets=True)
    bundle_trust = OriginTrust(_bundle_root(test_ca))
    first, verdict = verified_and_used(bundle_trust, port)
    assert verdict.ok
    session, fingerprint = bundle_trust.sessions.offer(("127.0.0.1", port, ORIGIN))
    assert fingerprint == hashlib.sha256(issued.certificate.public_bytes(Encoding.DER)).digest()
    close_cleanly(first)
    # The same session and its SHA-256 planted under a name the certificate does not
    # carry: the name check looks the pair up, does not find it, checks: refused.
    bundle_trust.sessions.put(("127.0.0.1", port, "elsewhere.example"), session, fingerprint)
    other, verdict = verified_and_used(bundle_trust, port, "elsewhere.example")
    assert resumed(other) and verdict.result == "bad_name"


def test_a_connection_that_failed_verification_leaves_no_session(trust, listen):
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], None), tickets=True
    )
    origin, verdict = verified_and_used(trust, port)
    assert verdict.result == "unknown_issuer" and len(trust.sessions) == 0


def test_kept_sessions_are_capped_least_recently_used_first_and_age():
    from tproxy_twist.tls.verify import OriginSessions

    clock = Clock()
    sessions = OriginSessions(clock, size=2, max_age=60)
    a, b, c = object(), object(), object()
    sessions.put(("192.0.2.1", 443, "a.example"), a)
    sessions.put(("192.0.2.1", 443, "b.example"), b)
    assert sessions.get(("192.0.2.1", 443, "a.example")) is a  # now the most recent
    sessions.put(("192.0.2.1", 443, "c.example"), c)
    assert sessions.get(("192.0.2.1", 443, "b.example")) is None and len(sessions) == 2
    clock.advance(61)
    assert sessions.get(("192.0.2.1", 443, "a.example")) is None
    assert len(sessions) == 1


def test_a_resumed_sessions_name_check_is_kept_per_certificate_and_name(trust, test_ca, listen):
    if not trust.resumes:
        trust = OriginTrust(trust.trust_root)  # the shared context, which resumes
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca), tickets=True
    )
    first, verdict = verified_and_used(trust, port)
    close_cleanly(first)
    second, verdict = verified_and_used(trust, port)  # resumed: the name checked once
    assert verdict.ok and resumed(second)
    close_cleanly(second)
    assert list(trust.sessions.name_checks.values()) == [None]
    # The same certificate resumed for a name it does not carry: a check of its own.
    session = trust.sessions.get(("127.0.0.1", port, ORIGIN))
    trust.sessions.put(("127.0.0.1", port, "elsewhere.example"), session)
    other, verdict = verified_and_used(trust, port, "elsewhere.example")
    assert verdict.result == "bad_name"
    assert [name for _, name in trust.sessions.name_checks] == [ORIGIN, "elsewhere.example"]
    # Asked again, the kept answer is the same.
    third, verdict = verified_and_used(trust, port)
    assert verdict.ok and resumed(third)
    close_cleanly(third)


def test_a_name_check_that_breaks_fails_closed_and_logs_once_per_interval(
    test_ca, listen, tmp_path: Path, monkeypatch
):
    import twisted.internet._service_identity as service_identity
    from twisted.logger import Logger

    from tproxy_twist.tls import verify

    def broken(*args, **kwargs):
        raise RuntimeError("a certificate the name check chokes on")

    monkeypatch.setattr(service_identity, "verify_service_identity", broken)
    events = []
    monkeypatch.setattr(verify, "log", Logger(observer=events.append))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(test_ca.cert_pem)
    trust = OriginTrust(load_trust_root(str(bundle)), clock=Clock())  # time stands still
    assert trust.resumes  # the shared context, whose callback checks the name
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    for _ in range(3):
        origin, verdict = verified_and_used(trust, port)
        assert not verdict.ok  # never vouched for without a name check
        close(origin)
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)


# --- full handshakes: the name check kept per (certificate, name) --------------------------


@pytest.fixture
def counted_trust(test_ca, tmp_path: Path, monkeypatch):
    """A shared-context trust whose service_identity pattern extractions are counted."""
    import twisted.internet._service_identity as service_identity

    calls = []
    extract = service_identity.extract_patterns

    def counting(certificate):
        calls.append(certificate)
        return extract(certificate)

    monkeypatch.setattr(service_identity, "extract_patterns", counting)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(test_ca.cert_pem)
    trust = OriginTrust(load_trust_root(str(bundle)), clock=Clock())
    assert trust.resumes  # the shared context, whose callback checks the name
    return trust, calls


def test_a_full_handshakes_name_check_is_kept_per_certificate_and_name(
    counted_trust, test_ca, listen
):
    trust, calls = counted_trust
    first = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    for _ in range(2):  # no session offered (no destination): two full handshakes
        origin, verdict = verify(trust, first)
        assert verdict.ok
        close(origin)
    assert len(calls) == 1
    # Another certificate for the same name: checked again.
    second = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    origin, verdict = verify(trust, second)
    assert verdict.ok and len(calls) == 2
    close(origin)
    # The same certificate for a name it does not carry: checked, and refused each time.
    for _ in range(2):
        origin, verdict = verify(trust, first, "elsewhere.example")
        assert verdict.result == "bad_name" and "elsewhere.example" in verdict.detail
        close(origin)
    assert len(calls) == 3


def test_a_kept_name_check_never_passes_a_chain_that_fails(counted_trust, listen):
    trust, calls = counted_trust
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], None))
    for _ in range(2):
        origin, verdict = verify(trust, port)
        assert verdict.result == "unknown_issuer"  # OpenSSL checks the chain every time
        close(origin)


def test_kept_name_checks_are_bounded_least_recently_used_first(
    counted_trust, test_ca, listen, monkeypatch
):
    from tproxy_twist.tls import verify as verify_module

    monkeypatch.setattr(verify_module, "_NAME_CHECKS_KEPT", 2)
    trust, calls = counted_trust
    ports = [
        listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
        for _ in range(3)
    ]
    for port in ports:
        origin, verdict = verify(trust, port)
        assert verdict.ok
        close(origin)
    assert len(calls) == 3 and len(trust.sessions.name_checks) == 2
    origin, verdict = verify(trust, ports[0])  # the oldest was dropped: checked again
    assert verdict.ok and len(calls) == 4
    close(origin)
    origin, verdict = verify(trust, ports[2])  # still kept
    assert verdict.ok and len(calls) == 4
    close(origin)


def test_a_session_offered_but_not_resumed_is_checked_by_the_full_handshake_alone(
    counted_trust, test_ca, listen, monkeypatch
):
    from tproxy_twist.tls import verify as verify_module

    asked = []
    name_problem = verify_module._ResumingCreator.name_problem

    def counting(creator, connection):
        asked.append(connection)
        return name_problem(creator, connection)

    monkeypatch.setattr(verify_module._ResumingCreator, "name_problem", counting)
    trust, calls = counted_trust
    # No tickets, no session cache: the kept session is offered and never resumed.
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    for _ in range(2):
        origin, verdict = verified_and_used(trust, port)
        assert verdict.ok and not resumed(origin)
        close_cleanly(origin)
    assert trust.sessions.get(("127.0.0.1", port, ORIGIN)) is not None  # it was offered
    assert asked == [] and len(calls) == 1


# --- key share prediction ---------------------------------------------------------------------


def _hello_key_shares(creator) -> tuple[list[int], list[int]]:
    """The groups of the key shares and of supported_groups in the hello C{creator} makes."""
    from OpenSSL import SSL

    class Transport:  # what Twisted's per-connection creator asks a TLS transport
        class factory:
            wrappedFactory = None

    connection = creator.clientConnectionForTLS(Transport())
    connection.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    body = connection.bio_read(1 << 16)[5:]  # one handshake record: the ClientHello
    pos = 4 + 2 + 32
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    extensions = {}
    while pos < end:
        kind, size = (
            int.from_bytes(body[pos : pos + 2], "big"),
            int.from_bytes(body[pos + 2 : pos + 4], "big"),
        )
        extensions[kind] = body[pos + 4 : pos + 4 + size]
        pos += 4 + size
    shares, data, at = [], extensions[51], 2
    while at < len(data):
        shares.append(int.from_bytes(data[at : at + 2], "big"))
        at += 4 + int.from_bytes(data[at + 2 : at + 4], "big")
    supported = extensions[10]
    groups = [int.from_bytes(supported[i : i + 2], "big") for i in range(2, len(supported), 2)]
    return shares, groups


X25519, X25519MLKEM768 = 0x001D, 0x11EC


def test_the_next_hello_to_an_origin_that_chose_x25519_sends_its_key_share_alone(
    trust, test_ca, listen
):
    port = listen(
        protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca), groups=b"x25519"
    )
    key = ("127.0.0.1", port)
    shares, groups = _hello_key_shares(trust.creator(ORIGIN, key))
    assert shares == [X25519MLKEM768, X25519]  # OpenSSL's default: the hybrid's and X25519's
    first, verdict = verified_and_used(trust, port)
    assert verdict.ok
    close(first)
    shares, groups = _hello_key_shares(trust.creator(ORIGIN, key))
    if trust.resumes:
        # X25519's share alone; the hybrid is still named (the origin may ask for it).
        assert shares == [X25519]
        assert X25519MLKEM768 in groups and groups[0] == X25519
        # Any name at that address: the choice is the server's.
        assert _hello_key_shares(trust.creator("127.0.0.1", key))[0] == [X25519]
    else:
        assert shares == [X25519MLKEM768, X25519]  # no shared context, nothing kept
    # Another origin address predicts nothing.
    assert _hello_key_shares(trust.creator(ORIGIN, ("127.0.0.1", port + 1)))[0] == [
        X25519MLKEM768,
        X25519,
    ]


def test_an_origin_that_chose_the_hybrid_keeps_both_key_shares(trust, test_ca, listen):
    port = listen(protocol.Factory.forProtocol(Echo), make_server_cert([ORIGIN], test_ca))
    first, verdict = verified_and_used(trust, port)
    assert verdict.ok
    close(first)
    shares, _ = _hello_key_shares(trust.creator(ORIGIN, ("127.0.0.1", port)))
    assert shares == [X25519MLKEM768, X25519]


def test_a_prediction_is_dropped_when_the_origin_chooses_the_hybrid_again():
    from tproxy_twist.tls.verify import OriginSessions

    sessions = OriginSessions(size=2)
    key = ("192.0.2.1", 443, "a.example")
    sessions.chose(key, b"x25519")
    assert sessions.key_share(key).startswith(b"x25519:")
    assert sessions.key_share(("192.0.2.1", 443, "b.example")) == sessions.key_share(key)
    sessions.chose(key, b"X25519MLKEM768")
    assert sessions.key_share(key) is None
    sessions.chose(key, b"secp256r1")
    assert sessions.key_share(key).startswith(b"secp256r1:")
    sessions.chose(key, None)  # not known (another OpenSSL): OpenSSL's default
    assert sessions.key_share(key) is None
    for host in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):  # least recently used first out
        sessions.chose((host, 443, "a.example"), b"x25519")
    assert sessions.key_share(("192.0.2.2", 443, "a.example")) is None
    assert sessions.key_share(("192.0.2.4", 443, "a.example")) is not None


def test_an_origin_that_wants_another_group_than_predicted_asks_for_it_and_is_remembered(
    trust, test_ca, listen
):
    # The origin learned the hybrid (here: knows nothing else) since it chose X25519:
    # the predicted hello has the wrong share, the origin asks for its group
    # (HelloRetryRequest), the handshake is verified, and the prediction is dropped.
    port = listen(
        protocol.Factory.forProtocol(Echo),
        make_server_cert([ORIGIN], test_ca),
        groups=b"X25519MLKEM768",
    )
    key = ("127.0.0.1", port, ORIGIN)
    trust.sessions.chose(key, b"x25519")
    if trust.resumes:
        assert _hello_key_shares(trust.creator(ORIGIN, key[:2]))[0] == [X25519]
    first, verdict = verified_and_used(trust, port)
    assert verdict.ok
    close(first)
    assert _hello_key_shares(trust.creator(ORIGIN, key[:2]))[0] == [X25519MLKEM768, X25519]


def _mode(context) -> int:
    """The context's mode: SSL_CTX_set_mode(ctx, 0) answers it and changes nothing."""
    from OpenSSL.SSL import _lib

    return _lib.SSL_CTX_set_mode(context._context, 0)


def test_origin_connections_release_their_record_buffers_while_idle(test_ca, tmp_path: Path):
    # Twisted's CertificateOptions sets the mode on the context the origin
    # connections share; the bump server's sets it itself (test_tls_leaf.py).
    from OpenSSL import SSL

    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(test_ca.cert_pem)
    trust = OriginTrust(load_trust_root(str(bundle)), shared_context=True)
    context = trust.creator(ORIGIN).clientConnectionForTLS(None).get_context()
    assert _mode(context) & SSL.MODE_RELEASE_BUFFERS
