"""
The local certificate authority that signs bumped connections' leaves.

L{create_ca} makes one (what C{tproxy-twist ca init} runs): an EC P-256 key
and a self-signed certificate that may sign end-entity certificates only
(C{pathLenConstraint} 0).  L{write_ca} stores them; the key file is created
with mode 0600 and owned by root, and is never readable by anyone else,
not even for a moment.  L{load_ca} reads them back (a worker calls it as
root, before it drops privileges) and refuses a key file that group or
others may access.

This module uses C{cryptography} only: it is imported by bump code paths
and the C{ca} command, never by a worker without a bump port.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import stat
import tempfile

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import TLSConfig

__all__ = [
    "CAError",
    "CertificateAuthority",
    "DEFAULT_CA_CERT",
    "DEFAULT_CA_KEY",
    "create_ca",
    "fingerprint",
    "key_file_problem",
    "load_ca",
    "write_ca",
]

DEFAULT_CA_CERT: str = attrs.fields(TLSConfig).ca_cert.default
DEFAULT_CA_KEY: str = attrs.fields(TLSConfig).ca_key.default

#: Validity of a new CA.  Long, because every client has to install it again
#: when it is replaced.
DEFAULT_CA_DAYS = 3650
_BACKDATE = datetime.timedelta(days=1)  # clients whose clocks are behind


class CAError(Exception):
    """The CA's files cannot be used; C{str(error)} names the file and the reason."""


@attrs.frozen
class CertificateAuthority:
    """
    A CA certificate and its key, checked to belong together.

    @ivar chain: further certificates that followed the CA's own in its
        file (an intermediate CA's issuers); sent to clients after it.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    cert_path: str = ""
    key_path: str = ""

    #: The CA's SKI (computed from its key when the certificate has none);
    #: found once, as every leaf's AKI repeats it.
    subject_key_identifier: x509.SubjectKeyIdentifier = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        try:
            ski = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        object.__setattr__(self, "subject_key_identifier", ski)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self) -> datetime.datetime:
        return self.certificate.not_valid_before_utc


def default_name() -> str:
    """C{"tproxy-twist CA on HOST"}, cut to the 64 characters a common name may have."""
    return f"tproxy-twist CA on {socket.gethostname()}"[:64]


def create_ca(
    name: str, now: datetime.datetime, days: int = DEFAULT_CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """
    A new EC P-256 key and a self-signed CA certificate for it: C{CA:TRUE,
    pathlen:0} (critical), key usage C{keyCertSign, cRLSign} (critical),
    a subject key identifier, valid from a day before C{now} for C{days}.
    Raises C{ValueError} for a name that is empty or longer than 64 characters.
    """
    if not name or len(name) > 64:
        raise ValueError("the CA name must be 1 to 64 characters")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tproxy-twist"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def write_ca(
    key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    cert_path: str,
    key_path: str,
    force: bool = False,
) -> None:
    """
    Store a CA: the key (PKCS#8 PEM) with mode 0600, owned by root when we
    are root; the certificate (PEM) with mode 0644.  Each file is written
    under a temporary name created with its final mode, then renamed, so
    no one ever sees a half-written file or a readable key.  Without
    C{force} an existing file is left alone and L{CAError} says so.
    """
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise CAError(f"{path}: already exists; --force replaces it")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    _write_file(key_path, key_pem, 0o600, force)
    _write_file(cert_path, cert_pem, 0o644, force)


def _write_file(path: str, data: bytes, mode: int, replace: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        # mkstemp creates the file with mode 0600: a key is never readable by others.
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    except OSError as e:
        raise CAError(f"{path}: cannot create: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if os.geteuid() == 0:
                os.fchown(f.fileno(), 0, 0)
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if the file appeared meanwhile
    except OSError as e:
        reason = "already exists; --force replaces it" if e.errno == errno.EEXIST else e.strerror
        raise CAError(f"{path}: cannot write: {reason}") from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def key_file_problem(st: os.stat_result) -> str | None:
    """
    What is wrong with a CA key file's permissions, or C{None}.  Group or
    others may not have any access: whoever can read the key can make
    certificates every client that installed the CA trusts.
    """
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_mode & 0o077:
        return (
            f"group or others have access (mode {stat.S_IMODE(st.st_mode):04o});"
            " the CA key must be readable by its owner only: chmod 600"
        )
    return None


def load_ca(cert_path: str, key_path: str, now: datetime.datetime) -> CertificateAuthority:
    """
    Read and check a CA: the key file's permissions (L{key_file_problem}),
    a PEM private key (EC or RSA, not encrypted), a certificate file whose
    first certificate is a CA (C{basicConstraints CA:TRUE}, allowed to sign
    certificates) for that key, valid at C{now}.  Raises L{CAError} naming
    the file.  Runs as root in a worker, before it drops privileges.
    """
    key = _load_key(key_path)
    certificates = _load_certificates(cert_path)
    certificate = certificates[0]
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CAError(f"{cert_path}: its key usage does not allow signing certificates")
    if not _allows_server_auth(certificate):
        raise CAError(f"{cert_path}: its extended key usage does not include serverAuth")
    if certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAError(f"{key_path}: is not the key of the certificate in {cert_path}")
    if now >= certificate.not_valid_after_utc:
        raise CAError(f"{cert_path}: expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if now < certificate.not_valid_before_utc:
        raise CAError(
            f"{cert_path}: not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M}"
            " UTC (is this machine's clock right?)"
        )
    return CertificateAuthority(
        certificate=certificate,
        key=key,
        chain=tuple(certificates[1:]),
        cert_path=cert_path,
        key_path=key_path,
    )


def _load_key(path: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CAError(f"{path}: is a symbolic link; name the key file itself") from None
        raise CAError(f"{path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        problem = key_file_problem(os.fstat(f.fileno()))
        if problem is not None:
            raise CAError(f"{path}: {problem}")
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{path}: the key is encrypted; store it without a passphrase") from None
    except ValueError:
        raise CAError(f"{path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{path}: an EC or RSA key is needed, not {type(key).__name__}")
    return key


def _load_certificates(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CAError(f"{path}: cannot read: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"{path}: no PEM certificate in it") from None
    return certificates


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint as C{AA:BB:...}, as browsers and C{openssl x509} show it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _allows_server_auth(certificate: x509.Certificate) -> bool:
    """Whether an EKU extension on the CA, if any, lets its leaves serve TLS."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    allowed = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    return any(oid in usage for oid in allowed)
