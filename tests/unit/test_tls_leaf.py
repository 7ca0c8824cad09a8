"""
Forged leaf certificates, the per-worker leaf cache, and the server side
of a bumped connection (real OpenSSL handshakes over memory BIOs).
"""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL, crypto
from twisted.internet.task import Clock

from tproxy_twist.tls.ca import CertificateAuthority, create_ca
from tproxy_twist.tls.leaf import (
    LEAF_BACKDATE,
    LEAF_VALIDITY,
    BumpServerTLS,
    LeafCache,
    NoHTTP11,
    forge_leaf,
    leaf_name,
)
from tproxy_twist.tls.pinning import client_rejected_certificate
from tproxy_twist.tls.testing import make_ca, memory_handshake, now_utc

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    key, certificate = create_ca("leaf test CA", NOW - datetime.timedelta(days=10))
    return CertificateAuthority(certificate, key)


def clock_at(when: datetime.datetime) -> Clock:
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


def leaf_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, name",
    [
        (b"Example.COM", "example.com"),
        (b"www.example.com.", "www.example.com"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        (b"192.0.2.7", "192.0.2.7"),
        ("2001:DB8::1", "2001:db8::1"),
        (b"*.example.com", None),
        (b"exa mple.com", None),
        (b"-bad.example.com", None),
        (b"a..b", None),
        (b"", None),
        ("b\u00fccher.example".encode(), None),
        (b"a" * 64 + b".com", None),
        (b".".join([b"a" * 63] * 4) + b"x", None),
    ],
)
def test_leaf_names_are_normalised_and_untrusted_snis_refused(raw, name):
    assert leaf_name(raw) == name


@given(st.binary(max_size=300))
def test_any_accepted_name_is_a_valid_dns_name_or_ip_address(raw):
    name = leaf_name(raw)
    if name is None:
        return
    try:
        ipaddress.ip_address(name)
    except ValueError:
        assert name == name.lower() and len(name) <= 253
        assert all(0 < len(label) <= 63 for label in name.split("."))
        x509.DNSName(name)  # cryptography accepts it


# --- one leaf -----------------------------------------------------------------------------


def test_a_leaf_names_the_sni_and_serves_tls_only(ca):
    key = leaf_key()
    leaf = forge_leaf(ca, key, "www.example.com", NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.example.com"
    assert leaf.issuer == ca.certificate.subject
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.subject_key_identifier.digest
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def test_a_leaf_is_backdated_a_day_and_short_lived(ca):
    leaf = forge_leaf(ca, leaf_key(), "example.com", NOW)
    assert leaf.not_valid_before_utc == NOW - LEAF_BACKDATE
    assert leaf.not_valid_after_utc == NOW + LEAF_VALIDITY


def test_a_leaf_never_outlives_its_ca():
    key, certificate = create_ca("short CA", NOW - datetime.timedelta(days=3650 - 5))
    short = CertificateAuthority(certificate, key)
    leaf = forge_leaf(short, leaf_key(), "example.com", NOW)
    assert leaf.not_valid_after_utc == certificate.not_valid_after_utc < NOW + LEAF_VALIDITY


def test_leaves_have_random_distinct_serials(ca):
    key = leaf_key()
    serials = {forge_leaf(ca, key, "example.com", NOW).serial_number for _ in range(20)}
    assert len(serials) == 20


def test_a_hello_without_sni_gets_an_ip_san_for_the_original_destination(ca):
    leaf = forge_leaf(ca, leaf_key(), "2001:db8::5", NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("2001:db8::5")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_a_name_too_long_for_a_common_name_gets_a_critical_san_and_no_subject(ca):
    name = ".".join(["a" * 60] * 3)
    leaf = forge_leaf(ca, leaf_key(), name, NOW)
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


@pytest.mark.parametrize("name", ["example.com", "192.0.2.1"])
def test_a_strict_rfc5280_verifier_accepts_the_leaf_for_its_name(ca, name):
    leaf = forge_leaf(ca, leaf_key(), name, NOW)
    store = verification.Store([ca.certificate])
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = verification.PolicyBuilder().store(store).time(NOW).build_server_verifier(subject)
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca.certificate
    other = verification.PolicyBuilder().store(store).time(NOW)
    with pytest.raises(verification.VerificationError):
        other.build_server_verifier(x509.DNSName("other.example")).verify(leaf, [])


# --- the cache ----------------------------------------------------------------------------


class RecordingMetrics:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.entries = 0

    def hit(self) -> None:
        self.events.append("hit")

    def miss(self) -> None:
        self.events.append("miss")

    def evicted(self) -> None:
        self.events.append("eviction")

    def size(self, entries: int) -> None:
        self.entries = entries


def test_the_cache_forges_a_leaf_once_per_host_and_counts_hits_and_misses(ca):
    metrics = RecordingMetrics()
    cache = LeafCache(ca, 10, clock_at(NOW), metrics)
    first = cache.get("example.com")
    assert cache.get("example.com") is first
    cache.get("example.org")
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 0)
    assert metrics.events == ["miss", "hit", "miss"]
    assert metrics.entries == len(cache) == 2


def test_the_cache_drops_the_least_recently_used_leaf_beyond_its_size(ca):
    metrics = RecordingMetrics()
    cache = LeafCache(ca, 2, clock_at(NOW), metrics)
    cache.get("a.example")
    cache.get("b.example")
    cache.get("a.example")  # b is now the least recently used
    cache.get("c.example")
    assert "b.example" not in cache
    assert "a.example" in cache and "c.example" in cache
    assert len(cache) == 2 and cache.evictions == 1
    assert metrics.events.count("eviction") == 1


def test_all_leaves_of_a_worker_share_its_one_key(ca):
    cache = LeafCache(ca, 10, clock_at(NOW))
    keys = {
        cache.get(name).to_cryptography().public_key().public_numbers()
        for name in ("a.example", "b.example", "192.0.2.1")
    }
    assert keys == {cache.key.to_cryptography_key().public_key().public_numbers()}
    assert LeafCache(ca, 10, clock_at(NOW)).key.to_cryptography_key().public_key() != (
        cache.key.to_cryptography_key().public_key()
    )


def test_a_cached_leaf_is_forged_again_before_it_expires(ca):
    clock = clock_at(NOW)
    cache = LeafCache(ca, 10, clock)
    first = cache.get("example.com")
    clock.advance((LEAF_VALIDITY - datetime.timedelta(days=2)).total_seconds())
    assert cache.get("example.com") is first
    clock.advance(datetime.timedelta(days=1, seconds=1).total_seconds())
    second = cache.get("example.com")
    assert second is not first
    renewed = second.to_cryptography().not_valid_after_utc
    assert renewed > first.to_cryptography().not_valid_after_utc
    assert (cache.hits, cache.misses) == (1, 2)


def test_a_cache_holds_at_least_one_leaf(ca):
    with pytest.raises(ValueError):
        LeafCache(ca, 0, clock_at(NOW))


# --- the server side: handshakes over memory BIOs -----------------------------------------


def client_connection(
    trusted: x509.Certificate | None,
    sni: bytes | None,
    alpn: list[bytes] | None = None,
) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if trusted is not None:
        context.get_cert_store().add_cert(crypto.X509.from_cryptography(trusted))
    context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if alpn:
        context.set_alpn_protos(alpn)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    if sni is not None:
        connection.set_tlsext_host_name(sni)
    return connection


def server_connection(server: BumpServerTLS, name: str) -> SSL.Connection:
    connection = server.creator(name).serverConnectionForTLS(None)
    connection.set_accept_state()
    return connection


@pytest.fixture
def live_ca() -> CertificateAuthority:
    key, certificate = create_ca("live test CA", now_utc())
    return CertificateAuthority(certificate, key)


@pytest.fixture
def server(live_ca) -> BumpServerTLS:
    clock = Clock()
    clock.advance(now_utc().timestamp())
    return BumpServerTLS(LeafCache(live_ca, 100, clock))


def peer_names(connection: SSL.Connection) -> list[str]:
    leaf = connection.get_peer_certificate().to_cryptography()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def test_a_client_trusting_the_ca_gets_a_leaf_for_its_sni_and_http11(server, live_ca):
    client = client_connection(live_ca.certificate, b"www.example.com", [b"h2", b"http/1.1"])
    assert memory_handshake(client, server_connection(server, "www.example.com")) == (None, None)
    assert peer_names(client) == ["www.example.com"]
    assert client.get_alpn_proto_negotiated() == b"http/1.1"
    chain = [c.to_cryptography() for c in client.get_peer_cert_chain()]
    assert chain[1] == live_ca.certificate


def test_a_client_without_alpn_is_served_without_alpn(server, live_ca):
    client = client_connection(live_ca.certificate, b"example.com")
    assert memory_handshake(client, server_connection(server, "example.com")) == (None, None)
    assert client.get_alpn_proto_negotiated() == b""


def test_a_hello_without_sni_gets_the_original_destinations_ip_san(server, live_ca):
    client = client_connection(live_ca.certificate, None, [b"http/1.1"])
    assert memory_handshake(client, server_connection(server, "203.0.113.9")) == (None, None)
    assert peer_names(client) == ["203.0.113.9"]


def test_an_sni_other_than_the_verified_name_gets_no_certificate(server, live_ca):
    client = client_connection(live_ca.certificate, b"evil.example", [b"http/1.1"])
    client_error, server_error = memory_handshake(client, server_connection(server, "good.example"))
    assert isinstance(client_error, SSL.Error) and isinstance(server_error, SSL.Error)
    assert client.get_peer_certificate() is None
    assert "evil.example" not in server.leaves and "good.example" not in server.leaves


def test_an_sni_that_is_not_a_host_name_gets_no_certificate(server, live_ca):
    client = client_connection(live_ca.certificate, b"*.example.com", [b"http/1.1"])
    client_error, _ = memory_handshake(client, server_connection(server, "example.com"))
    assert isinstance(client_error, SSL.Error)
    assert client.get_peer_certificate() is None and len(server.leaves) == 0


def test_an_h2_only_client_gets_the_no_application_protocol_alert(server, live_ca):
    client = client_connection(live_ca.certificate, b"example.com", [b"h2"])
    client_error, server_error = memory_handshake(client, server_connection(server, "example.com"))
    assert isinstance(server_error, NoHTTP11)
    assert "no application protocol" in str(client_error)


def test_a_client_without_the_ca_refuses_the_leaf_and_that_is_recognised(server):
    stranger = make_ca("some other CA").certificate
    client = client_connection(stranger, b"example.com", [b"http/1.1"])
    client_error, server_error = memory_handshake(client, server_connection(server, "example.com"))
    assert client_error is not None and server_error is not None
    assert client_rejected_certificate(server_error)


def test_other_handshake_failures_are_not_taken_for_a_rejected_certificate(server, live_ca):
    client = client_connection(live_ca.certificate, b"example.com", [b"h2"])
    _, server_error = memory_handshake(client, server_connection(server, "example.com"))
    assert server_error is not None and not client_rejected_certificate(server_error)


def test_an_intermediate_cas_chain_is_sent_so_clients_trusting_the_root_accept():
    root = make_ca("test root")
    intermediate = make_ca("test intermediate", issuer=root, path_length=0)
    ca = CertificateAuthority(intermediate.certificate, intermediate.key, (root.certificate,))
    clock = Clock()
    clock.advance(now_utc().timestamp())
    server = BumpServerTLS(LeafCache(ca, 10, clock))
    client = client_connection(root.certificate, b"example.com", [b"http/1.1"])
    assert memory_handshake(client, server_connection(server, "example.com")) == (None, None)
    chain = [c.to_cryptography() for c in client.get_peer_cert_chain()]
    assert chain[1:] == [intermediate.certificate, root.certificate]


def test_bumped_client_connections_release_their_record_buffers_while_idle(server):
    from OpenSSL import SSL
    from OpenSSL.SSL import _lib

    context = server_connection(server, "example.com").get_context()
    # SSL_CTX_set_mode(ctx, 0) answers the context's mode and changes nothing.
    assert _lib.SSL_CTX_set_mode(context._context, 0) & SSL.MODE_RELEASE_BUFFERS
