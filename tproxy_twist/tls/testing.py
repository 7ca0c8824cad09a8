"""
Certificates for tests: a test CA, intermediates, and origin certificates
that are good, name the wrong host, are self-signed or have expired.

Public so that unit tests, end-to-end tests (an nginx origin's
certificate) and the benchmark make them the same way.  Never used by the
proxy itself.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "make_ca", "make_server_cert", "memory_handshake", "now_utc", "wait_for"]


@attrs.frozen
class Issued:
    """A key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    name: str = "tproxy-twist test CA",
    *,
    issuer: Issued | None = None,
    path_length: int | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A CA: a root (self-signed) or, with C{issuer}, an intermediate."""
    now = now_utc()
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    signer = issuer.key if issuer is not None else key
    issuer_name = issuer.certificate.subject if issuer is not None else _name(name)
    issuer_public = issuer.key.public_key() if issuer is not None else key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    )
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def make_server_cert(
    names: Sequence[str],
    issuer: Issued | None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """
    A TLS server certificate for C{names} (DNS names or IP addresses),
    signed by C{issuer}, or self-signed when C{issuer} is C{None}.
    """
    now = now_utc()
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = _name(names[0])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return Issued(key, builder.sign(issuer.key if issuer is not None else key, hashes.SHA256()))


def wait_for(deferred, timeout: float = 15.0, reactor=None):
    """
    Iterate the (global) reactor until C{deferred} fires; return its result
    or raise its failure.  For tests that use real loopback sockets without
    running the reactor; C{AssertionError} if nothing happened in C{timeout}.
    """
    import time

    from twisted.python.failure import Failure

    if reactor is None:
        from twisted.internet import reactor
    box: list = []
    deferred.addBoth(box.append)
    deadline = time.monotonic() + timeout
    while not box and time.monotonic() < deadline:
        reactor.iterate(0.01)
    assert box, "the event did not happen in time"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def memory_handshake(client, server, rounds: int = 20) -> tuple[BaseException | None, ...]:
    """
    Run a TLS handshake between two pyOpenSSL connections over memory BIOs
    (no sockets).  Returns C{(client_error, server_error)}: C{None} for a
    side whose handshake completed, else the exception it ended with (a
    C{RuntimeError} for one still waiting).
    """
    from OpenSSL import SSL

    done: dict[object, BaseException | None] = {}

    def step(connection) -> None:
        if connection in done:
            return
        try:
            connection.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            done[connection] = e
            return
        done[connection] = None

    def move(source, target) -> bool:
        try:
            data = source.bio_read(1 << 20)
        except SSL.Error:  # nothing to send (WantReadError), or nothing ever again
            return False
        target.bio_write(data)
        return True

    for _ in range(rounds):
        step(client)
        step(server)
        moved = move(client, server)
        moved = move(server, client) or moved
        if not moved:  # everything sent has been processed
            break
    unfinished = RuntimeError("the handshake did not finish")
    return done.get(client, unfinished), done.get(server, unfinished)
