"""
Verifying the origin before a connection is bumped.

The bump's first step: on the spoofed upstream connection, do the TLS
handshake as a client with the client's SNI, through Twisted's
C{optionsForClientTLS} machinery, so that OpenSSL checks the chain against
the trust store and service_identity checks the name.  L{OriginTLS} is the
upstream protocol that does it; its C{verdict} fires with an
L{OriginVerdict}: C{ok}, or why not, as one of L{VERIFY_RESULTS}.  Only
after C{ok} may the client get a proxy-signed certificate; the caller then
L{attaches <OriginTLS.attach>} the protocol that relays decrypted bytes.

L{OriginTrust} is built once per worker: the trust store (the system's, or
a configured bundle) is loaded once, not per connection (see
L{_creator_maker} for why that matters).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import defer, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    VerificationError,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logthrottle import LogThrottle
from .leaf import ALPN_HTTP11
from .membio import client_tls

__all__ = [
    "OriginSessions",
    "OriginTLS",
    "OriginTrust",
    "OriginVerdict",
    "TrustError",
    "VERIFY_RESULTS",
    "classify_failure",
    "load_trust_root",
]

log = Logger()

#: Every result a verification can have (a bounded metric label).
VERIFY_RESULTS = (
    "ok",
    "bad_name",  # the certificate does not name the SNI (or the IP address)
    "unknown_issuer",  # self-signed, or no path to a trusted root
    "expired",  # expired or not yet valid
    "untrusted",  # any other chain problem: revoked, bad signature, wrong purpose...
    "handshake_failed",  # no TLS: alert, no shared cipher or ALPN, connection closed
    "timeout",  # no handshake within the time allowed
)

# X509_V_ERR_* codes (openssl/x509_vfy.h) that have a result of their own.
_UNKNOWN_ISSUER_CODES = frozenset({2, 18, 19, 20, 21})
_EXPIRED_CODES = frozenset({9, 10})
_BAD_NAME_CODES = frozenset({62, 64})  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_X509_V_OK = 0
_X509_V_ERR_UNSPECIFIED = 1


class TrustError(Exception):
    """A trust bundle that cannot be used; the message names the file."""


@attrs.frozen
class OriginVerdict:
    """
    How the origin's handshake went.

    @ivar result: one of L{VERIFY_RESULTS}.
    @ivar detail: what exactly, for a log line (never a metric label).
    @ivar alpn: the protocol the origin chose, C{None} when it chose none.
    """

    result: str
    detail: str = ""
    alpn: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def load_trust_root(bundle: str | None):
    """
    The trust root for origins: the system's (OpenSSL's default paths, as
    C{platformTrust}) when C{bundle} is C{None}, otherwise the PEM
    certificates in the file C{bundle}.  Raises L{TrustError}.
    """
    if bundle is None:
        return platformTrust()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        with open(bundle, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TrustError(f"{bundle}: cannot read: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TrustError(f"{bundle}: no PEM certificate in it") from None
    return trustRootFromCertificates(
        [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


def _creator_maker(trust_root, throttle: LogThrottle, name_checks: NameChecks | None = None):
    """
    Return C{make(server_name) -> IOpenSSLClientConnectionCreator}.

    C{optionsForClientTLS} builds a new C{SSL.Context} on every call and
    loads the trust store into it: with the system store that is about
    11 ms of CPU per connection (bench/tls_forge.py).  So the context is
    built once, by C{optionsForClientTLS} itself (trust store, verify
    flags, options), and each connection is made on it by L{_OriginCreator}:
    Twisted's C{ClientTLSOptions} for one name, without what it redoes per
    connection (0.26 ms: an IDNA encoding and a service_identity ID, a
    verify callback made with cffi, ALPN set on the connection).  The name
    is checked by the same service_identity call in the same place (the
    verify callback at depth 0, as twisted.internet._sslverify._verifyCB),
    and its answer kept in C{name_checks} per (certificate SHA-256, name):
    a full handshake with a certificate whose name was checked before
    skips service_identity's pattern extraction (0.1-0.2 ms).

    Private Twisted API (the options' C{_createConnection} and its
    C{getContext}, C{_idna}, C{_service_identity}), isolated here: when it is
    not there, every connection calls C{optionsForClientTLS}, slower, the
    same checks.
    """
    try:
        from twisted.internet._idna import _idnaBytes
        from twisted.internet._service_identity import (
            DNS_ID,
            IPAddress_ID,
            VerificationError,
            extract_patterns,
            verify_service_identity,
        )

        template = optionsForClientTLS(
            "tproxy-twist.invalid", trustRoot=trust_root, acceptableProtocols=[ALPN_HTTP11]
        )
        context = template._createConnection.__self__.getContext()
    except (ImportError, AttributeError):
        return _per_connection_maker(trust_root)

    def verify_name(connection, certificate, errno: int, depth: int, ok: int) -> bool:
        # twisted.internet._sslverify._verifyCB, once for the context: the
        # connection carries its name's ID and the TLS transport to fail.
        if depth != 0:
            return bool(ok)
        # The answer depends on the certificate's bytes and the name only: kept
        # per pair (OpenSSL still checks the chain, validity and signature).
        key = (_fingerprint(certificate), connection.name)
        connection.fingerprint = key[0]  # kept with the session (OriginSessions.put)
        known = name_checks.get(key, _UNKNOWN)
        if known is None:
            name_checks.move_to_end(key)
            return bool(ok)
        if isinstance(known, VerificationError):
            name_checks.move_to_end(key)
            connection.tls.failVerification(Failure(known))
            return False
        try:
            verify_service_identity(extract_patterns(certificate), [connection.name_id], [])
        except VerificationError as e:
            _keep(name_checks, key, e.with_traceback(None))
            connection.tls.failVerification(Failure(e))
            return False
        except BaseException:
            # A bug, or a certificate service_identity chokes on: an origin could
            # send it on every connection, so a traceback per interval at most.
            throttle.emit(
                log.failure, "verify-callback", "while verifying the origin's certificate"
            )
            return False  # never vouch for a name that was not checked
        _keep(name_checks, key, None)
        return bool(ok)

    if name_checks is None:
        name_checks = OrderedDict()
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify_name)
    context.set_alpn_protos([ALPN_HTTP11])

    def name_id(server_name: str):
        if isIPAddress(server_name) or isIPv6Address(server_name):
            return None, IPAddress_ID(server_name), server_name  # verified, never sent as SNI
        sni = _idnaBytes(server_name)
        return sni, DNS_ID(sni.decode("ascii")), server_name

    made: OrderedDict[str, _OriginCreator] = OrderedDict()

    def make(server_name: str) -> IOpenSSLClientConnectionCreator:
        creator = made.get(server_name)
        if creator is None:
            creator = made[server_name] = _OriginCreator(context, *name_id(server_name))
            if len(made) > _CREATORS_KEPT:
                made.popitem(last=False)
        return creator

    make.shared = True  # one SSL.Context: its sessions can be resumed
    return make


class _OriginConnection(SSL.Connection):
    """A client connection that carries what the shared verify callback needs."""

    name_id = None  # the service_identity ID of the name verified
    name = ""  # that name, as given (the key of its kept checks)
    tls = None  # the TLS transport (failVerification)
    fingerprint = None  # the SHA-256 of the certificate whose name was checked


@implementer(IOpenSSLClientConnectionCreator)
class _OriginCreator:
    """One name's client connections on the shared context (see L{_creator_maker})."""

    def __init__(self, context: SSL.Context, sni: bytes | None, name_id, name: str) -> None:
        self._context = context
        self._sni = sni
        self._name_id = name_id
        self._name = name

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = _OriginConnection(self._context, None)
        connection.name_id = self._name_id
        connection.name = self._name
        connection.tls = tlsProtocol
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _keep_resumable(connection: SSL.Connection) -> None:
    """
    Keep the session of C{connection} (verified, kept for the next
    connection: L{_ResumingCreator.verified}) resumable when the connection
    is freed.  OpenSSL marks a connection's session not resumable when the
    connection is freed without having sent close_notify (ssl_sess.c,
    C{ssl_clear_bad_session}), and the relay aborts an origin connection
    whenever its client leaves: an abandoned connection, not a failed one,
    whose session is as good as it was.  Marking close_notify as sent (the
    connection is over: nothing more is sent on it) leaves the session
    alone; a fatal error on the connection still makes OpenSSL forget it
    (RFC 5246, 7.2.2).  Before, a copy of the session was kept (an
    i2d/d2i of it, the peer's certificate parsed again: per connection).
    """
    connection.set_shutdown(connection.get_shutdown() | SSL.SENT_SHUTDOWN)


def _fingerprint(certificate) -> bytes:
    """The SHA-256 of a pyOpenSSL certificate's DER (X509.digest formats hex: slower)."""
    return hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)).digest()


# pyOpenSSL's binding (private API), for what pyOpenSSL does not say or set: bound
# once here (an import statement per connection costs the import machinery), used
# only by the functions below, each with its answer where the binding is missing.
try:
    from OpenSSL.SSL import _ffi as _binding_ffi
    from OpenSSL.SSL import _lib as _binding
except ImportError:  # pragma: no cover - another pyOpenSSL
    _binding_ffi = _binding = None


def _resumed(connection: SSL.Connection) -> bool:
    """
    Whether C{connection}'s handshake resumed a session.  pyOpenSSL does not
    say: private API (its binding's C{SSL_session_reused}), isolated here;
    without it, C{True} (the name is checked again, as for a resumed one).
    """
    try:
        return bool(_binding.SSL_session_reused(connection._ssl))
    except AttributeError:
        return True


# --- key share prediction ---------------------------------------------------------------
# A TLS 1.3 client sends a key share for the groups it expects the server to pick
# (RFC 8446, 4.2.8).  OpenSSL's default sends two: X25519MLKEM768 (post-quantum
# hybrid) and X25519, and making the ML-KEM share costs about 14 % of a new bumped
# connection's instructions (bench.conn_cpu --kind bump under callgrind); an origin
# that does not know the hybrid picks X25519, and the share (1.2 KB of the hello)
# was made for nothing.  So the group an origin chose in a
# verified handshake is remembered per origin address (OriginSessions.key_share),
# and the next connection sends its share alone, that group first in a list that
# still names every other group: an origin that has meanwhile learned the hybrid
# can ask for it (HelloRetryRequest), and then that is remembered.  Only a
# verified handshake teaches it (its transcript is signed: an attacker who strips
# the hybrid share from a hello breaks the handshake, it teaches nothing), and
# only the classic groups are predicted: an origin that chose the hybrid keeps
# OpenSSL's default, both shares.  Private API (the binding's SSL_get0_group_name
# and SSL_set1_curves_list, which is SSL_set1_groups_list), isolated here.

#: The groups a predicting connection names after the predicted one (OpenSSL's
#: default set, hybrids first); L{_groups_list} checks once that OpenSSL knows them.
_GROUPS = (
    b"X25519MLKEM768", b"SecP256r1MLKEM768", b"SecP384r1MLKEM1024", b"x25519",
    b"secp256r1", b"x448", b"secp384r1", b"secp521r1", b"ffdhe2048", b"ffdhe3072",
)  # fmt: skip
#: Groups whose share is sent alone when an origin chose one: the classic ones.
_PREDICTED = frozenset({b"x25519", b"secp256r1", b"x448", b"secp384r1", b"secp521r1"})
_lists: dict[bytes, bytes | None] = {}


def _chosen_group(connection: SSL.Connection) -> bytes | None:
    """The name of the group C{connection}'s handshake agreed on (C{x25519}), or C{None}."""
    try:
        name = _binding.SSL_get0_group_name(connection._ssl)
    except AttributeError:
        return None
    return None if name == _binding_ffi.NULL else _binding_ffi.string(name)


def _groups_list(group: bytes) -> bytes | None:
    """
    The groups list that sends C{group}'s key share alone (the first of a list
    without key-share marks gets the share), or C{None} (not a predicted group,
    or this OpenSSL takes no such list).
    """
    if group in _lists:
        return _lists[group]
    answer = None
    if group in _PREDICTED:
        try:
            probe = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
            for known in (_GROUPS, tuple(g for g in _GROUPS if g in _PREDICTED)):
                names = b":".join([group, *(g for g in known if g != group)])
                if _binding.SSL_set1_curves_list(probe._ssl, names) == 1:
                    answer = names
                    break
        except AttributeError:
            pass
    _lists[group] = answer
    return answer


def _offer_key_share(connection: SSL.Connection, groups: bytes) -> None:
    # Only called with a list _groups_list made, which needs the binding.
    _binding.SSL_set1_curves_list(connection._ssl, groups)


def _is_ip(name: str) -> bool:
    import ipaddress

    from .leaf import _maybe_ip

    if not _maybe_ip(name):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _per_connection_maker(trust_root):
    def make(server_name: str) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(
            server_name, trustRoot=trust_root, acceptableProtocols=[ALPN_HTTP11]
        )

    return make


#: Name checks kept: (certificate SHA-256, name) -> C{None} (the certificate
#: names it) or the exception that said why not (its traceback dropped).
NameChecks = OrderedDict[tuple[bytes, str], Exception | None]
_UNKNOWN = object()


def _keep(checks: NameChecks, key: tuple[bytes, str], answer: Exception | None) -> None:
    """Keep a name check's C{answer}, least recently used first out beyond L{_NAME_CHECKS_KEPT}."""
    checks[key] = answer
    checks.move_to_end(key)
    if len(checks) > _NAME_CHECKS_KEPT:
        checks.popitem(last=False)


#: Connection creators (one per name) kept by the shared-context maker.
_CREATORS_KEPT = 1024
#: Name checks of resumed sessions' certificates kept (L{OriginSessions.name_checks}).
_NAME_CHECKS_KEPT = 1024

#: Sessions of verified origin connections kept for resumption, per worker.
SESSION_CACHE_SIZE = 1024
#: A session older than this is not offered again, whatever the origin allows.
SESSION_MAX_AGE = 600.0


class OriginSessions:
    """
    The TLS sessions of origin connections whose handshake was verified,
    offered again (resumption: no certificate chain to send and verify,
    no signature) on the next connection to the same origin: keyed by
    (destination address, port, the name verified).  Least recently used
    first out beyond C{size}; none older than C{max_age} seconds is offered.

    A resumed handshake is still checked: OpenSSL keeps the verified chain's
    result in the session, and the name is verified on the session's
    certificate by the same service_identity check (L{OriginTLS}); a failed
    verdict forgets the key's session.
    """

    def __init__(
        self,
        clock: IReactorTime | None = None,
        size: int = SESSION_CACHE_SIZE,
        max_age: float = SESSION_MAX_AGE,
    ) -> None:
        self._clock = clock
        self._size = size
        self._max_age = max_age
        self._sessions: OrderedDict[
            tuple[str, int, str], tuple[float, SSL.Session, bytes | None]
        ] = OrderedDict()
        #: (certificate SHA-256, name) -> None, or why the certificate does not name
        #: it: service_identity's check, done once per pair (L{NameChecks}).
        self.name_checks: NameChecks = OrderedDict()
        #: (address, port) -> the groups list that sends the key share of the group
        #: the origin chose last (see "key share prediction" above), least recently
        #: used first out beyond C{size}.
        self._key_shares: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else 0.0

    def get(self, key: tuple[str, int, str]) -> SSL.Session | None:
        entry = self.offer(key)
        return None if entry is None else entry[0]

    def offer(self, key: tuple[str, int, str]) -> tuple[SSL.Session, bytes | None] | None:
        """The session kept for C{key} and the SHA-256 of its certificate (if known)."""
        entry = self._sessions.get(key)
        if entry is None:
            return None
        stored, session, fingerprint = entry
        if self._clock is not None and self._now() - stored > self._max_age:
            del self._sessions[key]
            return None
        self._sessions.move_to_end(key)
        return session, fingerprint

    def put(
        self,
        key: tuple[str, int, str],
        session: SSL.Session,
        fingerprint: bytes | None = None,
    ) -> None:
        """
        Keep C{session} for C{key}; C{fingerprint}: the SHA-256 of its peer
        certificate when known (a resumed handshake's name check then looks
        its answer up without reading the certificate out of the session).
        """
        self._sessions[key] = (self._now(), session, fingerprint)
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._size:
            self._sessions.popitem(last=False)

    def forget(self, key: tuple[str, int, str]) -> None:
        self._sessions.pop(key, None)

    def key_share(self, key: tuple[str, int, str]) -> bytes | None:
        """The groups list for a connection to C{key}'s origin (see L{chose}), or C{None}."""
        return self._key_shares.get(key[:2])

    def chose(self, key: tuple[str, int, str], group: bytes | None) -> None:
        """C{key}'s origin chose C{group} in a verified handshake: predict it next time."""
        origin = key[:2]
        groups = _groups_list(group) if group is not None else None
        if groups is None:
            self._key_shares.pop(origin, None)  # the hybrid (or unknown): OpenSSL's default
            return
        self._key_shares[origin] = groups
        self._key_shares.move_to_end(origin)
        while len(self._key_shares) > self._size:
            self._key_shares.popitem(last=False)


@implementer(IOpenSSLClientConnectionCreator)
class _ResumingCreator:
    """A connection creator that offers the session last verified for its key."""

    def __init__(self, inner, sessions: OriginSessions, key: tuple[str, int, str]) -> None:
        self._inner = inner
        self._sessions = sessions
        self.key = key
        self.offered = False
        self._offered_fingerprint: bytes | None = None

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        groups = self._sessions.key_share(self.key)
        if groups is not None:
            _offer_key_share(connection, groups)
        entry = self._sessions.offer(self.key)
        if entry is not None:
            connection.set_session(entry[0])
            self.offered = True
            self._offered_fingerprint = entry[1]
        return connection

    def name_problem(self, connection: SSL.Connection) -> str | None:
        """
        Why the certificate of C{connection} does not name the server, or
        C{None}.  Twisted checks the name in OpenSSL's verify callback, which
        a resumed handshake never calls (no certificate is sent): so after a
        session was offered the name is checked here, on the certificate the
        session carries: the offered one's (a resumed handshake resumes the one
        session offered), whose SHA-256 was kept with it when known.
        """
        from service_identity import CertificateError, VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        name = self.key[2]
        fingerprint = self._offered_fingerprint
        if fingerprint is None:
            certificate = connection.get_peer_certificate()
            fingerprint = _fingerprint(certificate) if certificate is not None else None
        connection.fingerprint = fingerprint  # kept with this connection's session
        # The answer depends on the certificate and the name only: kept per pair
        # (the full handshakes' verify callback keeps its answers there too).
        key = (fingerprint, name) if fingerprint is not None else None
        checks = self._sessions.name_checks
        answer = checks.get(key, _UNKNOWN) if key is not None else _UNKNOWN
        if answer is _UNKNOWN:
            answer = None
            try:
                if _is_ip(name):
                    verify_ip_address(connection, name)
                else:
                    verify_hostname(connection, name)
            except (CertificateError, VerificationError) as e:
                answer = e.with_traceback(None)
            if key is not None:
                _keep(checks, key, answer)
        else:
            checks.move_to_end(key)
        return None if answer is None else str(answer) or type(answer).__name__

    def verified(self, connection: SSL.Connection) -> None:
        """
        C{connection}'s handshake was verified: keep its session for the next
        one, and the group the origin chose for the next one's key share.
        """
        self._sessions.chose(self.key, _chosen_group(connection))
        session = connection.get_session()
        if session is not None:
            self._sessions.put(self.key, session, getattr(connection, "fingerprint", None))

    def failed(self) -> None:
        self._sessions.forget(self.key)


class OriginTrust:
    """
    What a worker verifies origins against, and the sessions of verified
    origins (L{OriginSessions}); L{creator} is per connection.
    """

    def __init__(
        self, trust_root, *, shared_context: bool = True, clock: IReactorTime | None = None
    ) -> None:
        self.trust_root = trust_root
        if clock is None:
            from twisted.internet import reactor as clock
        self.sessions = OriginSessions(clock)
        if shared_context:
            self._make = _creator_maker(trust_root, LogThrottle(clock), self.sessions.name_checks)
        else:
            self._make = _per_connection_maker(trust_root)
        #: Sessions are offered again (OpenSSL resumes only within one SSL.Context).
        self.resumes = getattr(self._make, "shared", False)

    def creator(
        self, server_name: str, destination: tuple[str, int] | None = None
    ) -> IOpenSSLClientConnectionCreator:
        """
        The client TLS options for one upstream connection: SNI and name
        verification for C{server_name} (a DNS name, or an IP address,
        which is verified but not sent as SNI), ALPN http/1.1.  With the
        C{destination} it connects to, the session of the last verified
        connection to it for that name is offered (see L{OriginSessions}).
        """
        inner = self._make(server_name)
        if destination is None or not self.resumes:
            return inner
        return _ResumingCreator(inner, self.sessions, (destination[0], destination[1], server_name))


def classify_failure(reason: Failure, connection: SSL.Connection | None) -> OriginVerdict:
    """
    Why a client handshake failed, from the failure its protocol was given
    and the OpenSSL connection's verification result.
    """
    code = _verify_result(connection)
    if code not in (None, _X509_V_OK, _X509_V_ERR_UNSPECIFIED):
        detail = _verify_error_string(code)
        if code in _UNKNOWN_ISSUER_CODES:
            return OriginVerdict("unknown_issuer", detail)
        if code in _EXPIRED_CODES:
            return OriginVerdict("expired", detail)
        if code in _BAD_NAME_CODES:
            return OriginVerdict("bad_name", detail)
        return OriginVerdict("untrusted", detail)
    if reason.check(VerificationError):
        return OriginVerdict("bad_name", str(reason.value))
    if reason.check(SSL.Error):
        return OriginVerdict("handshake_failed", _ssl_error_text(reason.value))
    return OriginVerdict(
        "handshake_failed", f"connection closed during the handshake ({reason.getErrorMessage()})"
    )


def _verify_result(connection: SSL.Connection | None) -> int | None:
    # pyOpenSSL has no SSL_get_verify_result: the binding it uses does.
    # Private API, isolated here; without it the failure is still classified.
    if connection is None:
        return None
    try:
        from OpenSSL.SSL import _lib

        return int(_lib.SSL_get_verify_result(connection._ssl))
    except (ImportError, AttributeError):
        return None


def _verify_error_string(code: int) -> str:
    try:
        from OpenSSL.SSL import _ffi, _lib

        return _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except (ImportError, AttributeError):
        return f"certificate verify error {code}"


def _ssl_error_text(error: Exception) -> str:
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return "; ".join(parts) or str(error) or type(error).__name__


@implementer(IHandshakeListener)
class OriginTLS(Protocol):
    """
    The upstream protocol of a bumped connection.  When connected it starts
    TLS with C{creator} (from L{OriginTrust.creator}); C{verdict} fires
    once with an L{OriginVerdict}, within C{timeout} seconds.  Cancelling
    C{verdict} aborts the connection.  After C{ok}, L{attach} hands the
    connection to the protocol that relays the decrypted stream.

    C{timer=False}: no timer of its own; the caller keeps the deadline
    (C{connected_at} + C{timeout}) and calls L{time_out} when it passes.
    """

    def __init__(
        self,
        creator: IOpenSSLClientConnectionCreator,
        clock: IReactorTime,
        timeout: float,
        *,
        timer: bool = True,
    ) -> None:
        self._creator = creator
        self._clock = clock
        self._timeout = timeout
        self._own_timer = timer
        #: when the TCP connection was made (C{None}: not yet)
        self.connected_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._tls: SSL.Connection | None = None
        self._memory = None  # the MemoryTLS on a TCP transport
        self._app: Protocol | None = None
        self._early: list[bytes] = []
        self._lost: Failure | None = None
        self._verified = False
        self._session_kept = False
        self.verdict: defer.Deferred[OriginVerdict] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        if self._own_timer:
            self._timer = self._clock.callLater(self._timeout, self.time_out)
        else:
            self.connected_at = self._clock.seconds()
        transport = self.transport
        # TCP_NODELAY is set on the socket before connecting (sockets.connect_upstream,
        # as for the splice): without it Nagle would hold the first request behind the
        # unacknowledged Finished, a delayed ACK (40 ms) on every new bumped connection.
        if isinstance(transport, tcp.Connection):
            # OpenSSL over memory BIOs, driven here (membio.py); self.transport is
            # now the MemoryTLS, which encrypts what is written to it.
            self._memory = client_tls(transport, self, self._creator)
            self._tls = self._memory.connection
            return
        # Any other transport (tests' fakes): Twisted's TLS layer, the same contract.
        transport.startTLS(self._creator)
        self._tls = transport.getHandle()

    def handshakeCompleted(self) -> None:
        # A session offered but not resumed: a full handshake, whose verify
        # callback checked the name already.
        if (
            getattr(self._creator, "offered", False)
            and self._tls is not None
            and _resumed(self._tls)
        ):
            problem = self._creator.name_problem(self._tls)
            if problem is not None:
                self._decide(OriginVerdict("bad_name", problem))
                self.transport.abortConnection()
                return
        # startTLS gives a TCP transport no negotiatedProtocol: ask OpenSSL.
        alpn = self._tls.get_alpn_proto_negotiated() if self._tls is not None else None
        self._decide(OriginVerdict("ok", alpn=alpn or None))

    def _keep_session(self) -> None:
        # TLS 1.3 tickets come after the handshake, ahead of the first bytes of
        # data: by then the connection's session is the resumable one.
        self._session_kept = True
        verified = getattr(self._creator, "verified", None)
        if verified is not None and self._tls is not None:
            verified(self._tls)

    def dataReceived(self, data: bytes) -> None:
        if self._verified and not self._session_kept:
            self._keep_session()
            self._bypass()
        if self._app is not None:
            self._app.dataReceived(data)
        else:
            self._early.append(data)

    def _bypass(self) -> None:
        # Attached and the session kept: nothing is left to do here per read, so the
        # decrypted bytes go straight to the relay's protocol.
        if self._app is not None and self._session_kept and self._memory is not None:
            self._memory.deliver_to(self._app.dataReceived)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._session_kept and self._tls is not None:
            _keep_resumable(self._tls)
        if not self.verdict.called:
            self._decide(classify_failure(reason, self._tls))
        elif self._app is not None:
            # Dropped: the relay's protocol refers back to this one's owner (a cycle).
            app, self._app = self._app, None
            app.connectionLost(reason)
        else:
            self._lost = reason

    def attach(self, protocol: Protocol) -> None:
        """
        From now on C{protocol} gets this connection's transport and its
        decrypted bytes (those that came before are replayed).  Only after
        an C{ok} verdict.
        """
        if not self._verified:
            raise RuntimeError("attach() before the origin was verified")
        self._app = protocol
        protocol.makeConnection(self.transport)
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._lost is not None:
            protocol.connectionLost(self._lost)
        else:
            self._bypass()

    def _decide(self, verdict: OriginVerdict) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.verdict.called:
            self._verified = verdict.ok
            if not verdict.ok:
                failed = getattr(self._creator, "failed", None)
                if failed is not None:
                    failed()  # whatever was kept for this origin is not offered again
            self.verdict.callback(verdict)

    def time_out(self) -> None:
        """No verdict within the time allowed: C{timeout}, and the connection is aborted."""
        self._timer = None
        if self.verdict.called:
            return
        self._decide(OriginVerdict("timeout", f"no TLS handshake within {self._timeout:g}s"))
        self.transport.abortConnection()

    def _cancel(self, verdict: defer.Deferred) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()
