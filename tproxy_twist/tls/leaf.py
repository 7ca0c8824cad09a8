"""
Forged leaf certificates for bumped connections, and the TLS server side
that presents them.

Each worker makes one EC P-256 key when it starts (L{LeafCache}); every
leaf it forges carries that key, so a leaked leaf key exposes one worker's
leaves, never the CA.  A leaf names one host: the client's SNI as a DNS
name, or, for a hello without SNI, the original destination as an IP
address.  Leaves are cached per host (LRU, capped); hits, misses and
evictions are counted.

L{BumpServerTLS} holds the one server C{SSL.Context} of a worker.  Its SNI
callback installs the leaf for the name on the connection, so contexts are
never made per host (about 26 KiB each); ALPN selects http/1.1 only.
"""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from collections import OrderedDict
from typing import Protocol as TypingProtocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .ca import CertificateAuthority
from .membio import MemoryTLS, server_tls

__all__ = [
    "ALPN_HTTP11",
    "BumpServerTLS",
    "LeafCache",
    "NoHTTP11",
    "forge_leaf",
    "leaf_name",
]

log = Logger()

# pyOpenSSL 26 deprecates passing its own X509/PKey objects in favour of
# cryptography's, but converts those on every call: about 0.6 ms per
# connection against 0.025 ms for the objects the cache keeps (see
# bench/tls_forge.py).  Until it offers a cached form, keep ours, quietly.
warnings.filterwarnings(
    "ignore",
    message=r"Passing pyOpenSSL (X509|PKey) objects is deprecated",
    category=DeprecationWarning,
)

ALPN_HTTP11 = b"http/1.1"
#: How long a leaf is valid (never past the CA's own end).
LEAF_VALIDITY = datetime.timedelta(days=30)
#: How far back a leaf's validity starts: clients whose clocks are behind.
LEAF_BACKDATE = datetime.timedelta(days=1)
#: A cached leaf this close to its end is forged again.
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)

_DNS_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _maybe_ip(name: str) -> bool:
    """
    Could C{ipaddress.ip_address(name)} accept C{name}?  Only an IPv6 address
    has a colon and only an IPv4 one is digits and dots: the parse (and its
    two exceptions) is skipped for every host name.
    """
    return ":" in name or name.replace(".", "").isdigit()


def leaf_name(name: str | bytes) -> str | None:
    """
    The name a leaf is made for: a DNS name in lower case without a final
    dot, or an IP address in its canonical form; C{None} for anything else
    (a client's SNI is untrusted input: no wildcards, no spaces, no
    non-ASCII, at most 253 characters and 63 per label).
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    if _maybe_ip(name):
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            pass
    name = name.lower().removesuffix(".")
    if not name or len(name) > 253:
        return None
    for label in name.split("."):
        if not 0 < len(label) <= 63 or not set(label) <= _DNS_LABEL_CHARS:
            return None
        if label.startswith("-") or label.endswith("-"):
            return None
    return name


def forge_leaf(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """
    A leaf for C{name} (as returned by L{leaf_name}) carrying C{key}'s
    public key, signed by C{ca}: SAN = the name (DNS or IP), EKU serverAuth,
    C{CA:FALSE}, key usage digitalSignature, AKI = the CA's SKI, a random
    serial, valid from a day before C{now} for 30 days, never past the CA.
    """
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    # A common name may be at most 64 characters; clients read the SAN anyway.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64 else [])
    not_before = max(now - LEAF_BACKDATE, ca.not_before)
    not_after = min(now + LEAF_VALIDITY, ca.not_after)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # With an empty subject the SAN must be critical (RFC 5280, 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([san]), critical=not len(subject))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.subject_key_identifier
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


class LeafCacheMetrics(TypingProtocol):
    """What L{LeafCache} reports (L{tproxy_twist.metrics.LeafCacheMetrics})."""

    def hit(self) -> None: ...
    def miss(self) -> None: ...
    def evicted(self) -> None: ...
    def size(self, entries: int) -> None: ...


class _NoMetrics:
    def hit(self) -> None:
        pass

    def miss(self) -> None:
        pass

    def evicted(self) -> None:
        pass

    def size(self, entries: int) -> None:
        pass


class LeafCache:
    """
    One worker's leaves: host name -> pyOpenSSL certificate, least recently
    used first out beyond C{capacity}.  A leaf within a day of its end is
    forged again (counted as a miss).

    @ivar key: the worker's leaf key (pyOpenSSL), made when the cache is.
    @ivar hits: lookups answered from the cache.
    @ivar misses: leaves forged.
    @ivar evictions: leaves dropped to stay within C{capacity}.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        capacity: int,
        clock: IReactorTime,
        metrics: LeafCacheMetrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("a leaf cache holds at least one leaf")
        self.ca = ca
        self.capacity = capacity
        self._clock = clock
        self._metrics = metrics if metrics is not None else _NoMetrics()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.key = crypto.PKey.from_cryptography_key(self._key)
        self._leaves: OrderedDict[str, tuple[crypto.X509, float]] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._leaves)

    def __contains__(self, name: str) -> bool:
        return name in self._leaves

    def get(self, name: str) -> crypto.X509:
        """The leaf for C{name} (as returned by L{leaf_name}), forged if needed."""
        now = self._clock.seconds()
        entry = self._leaves.get(name)
        if entry is not None and now < entry[1]:
            self._leaves.move_to_end(name)
            self.hits += 1
            self._metrics.hit()
            return entry[0]
        certificate = forge_leaf(
            self.ca, self._key, name, datetime.datetime.fromtimestamp(now, datetime.UTC)
        )
        renew_at = (certificate.not_valid_after_utc - LEAF_RENEW_BEFORE).timestamp()
        leaf = crypto.X509.from_cryptography(certificate)
        self._leaves[name] = (leaf, renew_at)
        self._leaves.move_to_end(name)
        self.misses += 1
        self._metrics.miss()
        while len(self._leaves) > self.capacity:
            self._leaves.popitem(last=False)
            self.evictions += 1
            self._metrics.evicted()
        self._metrics.size(len(self._leaves))
        return leaf


def _use_certificate(connection: SSL.Connection, certificate: crypto.X509) -> None:
    """
    C{connection.use_certificate(certificate)} without pyOpenSSL's deprecation
    warning per call (its binding's C{SSL_use_certificate}: private API,
    isolated here; without it, the public method).
    """
    if (
        _SSL_use_certificate is None
        or _SSL_use_certificate(connection._ssl, certificate._x509) != 1
    ):
        connection.use_certificate(certificate)  # raises OpenSSL's error, if any


try:
    from OpenSSL.SSL import _lib

    _SSL_use_certificate = _lib.SSL_use_certificate
except (ImportError, AttributeError):  # another pyOpenSSL
    _SSL_use_certificate = None


class NoHTTP11(SSL.Error):
    """The client offered ALPN protocols, none of them http/1.1 (alert no_application_protocol)."""


class _BumpConnection(SSL.Connection):
    """A server connection that knows which name its leaf may carry."""

    leaf_name: str | None = None


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, context: SSL.Context, name: str) -> None:
        self._context = context
        self._name = name

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        connection = _BumpConnection(self._context, None)
        connection.leaf_name = self._name
        return connection


class BumpServerTLS:
    """
    The server side of bumped connections in one worker: one C{SSL.Context}
    (TLS 1.2 and 1.3, ALPN http/1.1, the CA and its chain sent after the
    leaf), and an SNI callback that puts the cached leaf for the name on
    each connection.

    L{creator} makes the Twisted connection creator for one connection,
    given the name its leaf is for: the SNI that the origin was verified
    against, or the original destination's IP address when the hello had
    no SNI.  If the hello's SNI is not that name, no certificate is
    installed and the handshake fails with an alert: a leaf is only ever
    made for a name whose origin was verified.
    """

    def __init__(self, leaves: LeafCache) -> None:
        self.leaves = leaves
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        context.set_session_id(b"tproxy-twist-bump")
        # OpenSSL's record buffers (about 17 KB each way) are freed whenever a
        # connection has nothing half-read or unsent, as nginx does, and as
        # Twisted's CertificateOptions does for the origin side's context: an
        # idle bumped connection holds 18 KiB less, and a busy worker reuses
        # the same few buffers across its connections instead of touching each
        # connection's own (bench/README "Writes held to the end of the batch").
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        for certificate in (leaves.ca.certificate, *leaves.ca.chain):
            context.add_extra_chain_cert(crypto.X509.from_cryptography(certificate))
        # Every leaf of this worker carries its one key: set once here, each
        # connection copies it (SSL_new), the SNI callback adds only the leaf,
        # which OpenSSL checks against this key (SSL_use_certificate).
        context.use_privatekey(leaves.key)
        context.set_tlsext_servername_callback(self._install_leaf)
        context.set_alpn_select_callback(self._select_alpn)
        self.context = context

    def creator(self, name: str) -> IOpenSSLServerConnectionCreator:
        """
        A connection creator for C{transport.startTLS(creator, ...)} on the
        client's connection, presenting a leaf for C{name} (L{leaf_name}).
        """
        return _ServerCreator(self.context, name)

    def start(self, transport, name: str, hello: bytes = b"") -> MemoryTLS:
        """
        Start the bumped TLS session on an accepted client connection whose
        first bytes (C{hello}, the ClientHello the TLS layer read to decide)
        were already consumed: TLS as the server with a leaf for C{name},
        driven over memory BIOs (L{tproxy_twist.tls.membio}), fed first with
        those bytes, so nothing has to be peeked at or read twice.  From then
        on the connection's protocol receives the decrypted bytes, and its
        C{transport} is the returned L{MemoryTLS}, which encrypts what it
        is given.
        """
        connection = _BumpConnection(self.context, None)
        connection.leaf_name = name
        connection.set_accept_state()
        return server_tls(transport, connection, hello)

    def _install_leaf(self, connection: SSL.Connection) -> None:
        # OpenSSL calls this for every ClientHello, with or without SNI.  An
        # exception here would be lost inside OpenSSL's callback, so none is
        # raised: a connection without a certificate fails its handshake.
        expected = getattr(connection, "leaf_name", None)
        sni = connection.get_servername()
        if sni is None:
            name = expected
        elif expected is not None and sni == expected.encode():
            name = expected  # what leaf_name(sni) is: the name was made from this SNI
        else:
            name = leaf_name(sni)
            if expected is not None and name != expected:
                return
        if name is None:
            return
        try:
            _use_certificate(connection, self.leaves.get(name))
        except Exception:
            log.failure("cannot make a leaf certificate for {name}", name=name)

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> bytes:
        if ALPN_HTTP11 in offered:
            return ALPN_HTTP11
        # Raising makes OpenSSL send no_application_protocol (RFC 7301, 3.2).
        raise NoHTTP11("the client offered ALPN without http/1.1")
