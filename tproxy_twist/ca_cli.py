"""
C{tproxy-twist ca}: the local CA that bumped connections are signed with.

    tproxy-twist ca init [--dir D] [--name N] [--days N] [--force]
    tproxy-twist ca show [--dir D] [--pem]

Without C{--dir} the files are the configuration's C{[tls] ca_cert} and
C{ca_key} (default C{/etc/tproxy-twist/ca.pem} and C{ca.key}).  Imported
only when one of these commands runs: the rest of the command line never
loads C{cryptography}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import stat
from typing import TextIO

__all__ = ["add_ca_parser"]

CERT_NAME = "ca.pem"
KEY_NAME = "ca.key"


INSTALL = """\
Install it on the clients whose TLS this proxy may bump (and only those):
  Debian, Ubuntu:  cp {cert} /usr/local/share/ca-certificates/tproxy-twist.crt \\
                     && update-ca-certificates
  Fedora, RHEL:    cp {cert} /etc/pki/ca-trust/source/anchors/tproxy-twist.pem && update-ca-trust
  Chromium, Chrome and Firefox on Linux (NSS databases):
                   certutil -d sql:$HOME/.pki/nssdb -A -t "C,," -n tproxy-twist -i {cert}
  Firefox:         Settings > Privacy & Security > Certificates > Import
                   (or the enterprise policy Certificates.Install)
  Windows:         certutil -addstore -f Root {cert}
  macOS:           security add-trusted-cert -d -r trustRoot \\
                     -k /Library/Keychains/System.keychain {cert}
Compare the SHA-256 fingerprint above with what each client shows after installing.

"""


def add_ca_parser(commands, config_help: str, usage_error: type[Exception]) -> None:
    """
    Add the C{ca} command (with C{init} and C{show}) to the C{tproxy-twist}
    parser.  C{usage_error} is the command line's exception for a mistake
    the user can fix (printed, exit status 2).
    """
    ca = commands.add_parser(
        "ca",
        help="create or show the CA that bumped TLS connections are signed with",
        description="The local certificate authority for TLS bump: `init` creates an EC"
        " P-256 key (mode 0600, owned by root) and a self-signed CA certificate that can"
        " sign server certificates only (pathlen 0); `show` prints the certificate, its"
        " SHA-256 fingerprint and how to install it on clients. The files are the"
        " configuration's [tls] ca_cert and ca_key, or ca.pem and ca.key in --dir.",
    )
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create a new CA key and certificate",
        description="Create a new CA: an EC P-256 key, written with mode 0600 (owned by"
        " root when run as root; never readable by others, not even while it is"
        " written), and a self-signed certificate (CA:TRUE, pathlen 0, keyCertSign and"
        " cRLSign). Refuses to replace existing files without --force.",
    )
    _where(init, config_help)
    init.add_argument("--name", help='the CA\'s common name (default "tproxy-twist CA on HOST")')
    init.add_argument(
        "--days", type=int, default=3650, help="validity in days (default 3650: ten years)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(run=cmd_ca_init, usage_error=usage_error)

    show = actions.add_parser(
        "show",
        help="print the CA certificate and how to install it on clients",
        description="Print the CA certificate: subject, validity, SHA-256 fingerprint, the"
        " key file's permissions, how to install it on clients, and the PEM itself.",
    )
    _where(show, config_help)
    show.add_argument("--pem", action="store_true", help="print only the PEM certificate")
    show.set_defaults(run=cmd_ca_show, usage_error=usage_error)


def _where(parser: argparse.ArgumentParser, config_help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--dir", metavar="D", help=f"use {CERT_NAME} and {KEY_NAME} in this directory"
    )
    group.add_argument("--config", "-c", metavar="FILE", help=config_help)


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    """(certificate file, key file) named by --dir, or by the configuration."""
    if args.dir is not None:
        return os.path.join(args.dir, CERT_NAME), os.path.join(args.dir, KEY_NAME)
    from . import config as configuration

    try:
        if args.config is not None:
            tls = configuration.load(args.config).tls
        elif any(os.path.isfile(p) for p in configuration.default_paths()):
            tls = configuration.load_default().tls
        else:
            defaults = configuration.TLSConfig()
            return defaults.ca_cert, defaults.ca_key
    except configuration.ConfigError as e:
        raise args.usage_error(str(e)) from None
    return tls.ca_cert, tls.ca_key


def cmd_ca_init(args: argparse.Namespace, out: TextIO) -> int:
    from .tls.ca import CAError, create_ca, default_name, fingerprint, write_ca

    cert_path, key_path = _paths(args)
    if not 1 <= args.days <= 36500:
        raise args.usage_error("tproxy-twist ca init: --days must be from 1 to 36500")
    now = datetime.datetime.now(datetime.UTC)
    try:
        key, certificate = create_ca(args.name or default_name(), now, args.days)
    except ValueError as e:
        raise args.usage_error(f"tproxy-twist ca init: --name: {e}") from None
    try:
        write_ca(key, certificate, cert_path, key_path, force=args.force)
    except CAError as e:
        raise args.usage_error(f"tproxy-twist ca init: {e}") from None
    owner = _owner(os.stat(key_path).st_uid)
    out.write(
        f"tproxy-twist ca init: wrote {key_path} (EC P-256 key, mode 0600, owner {owner})"
        f" and {cert_path}\n"
        f"  subject:     {certificate.subject.rfc4514_string()}\n"
        f"  valid:       {_day(certificate.not_valid_before_utc)}"
        f" to {_day(certificate.not_valid_after_utc)}\n"
        f"  SHA-256:     {fingerprint(certificate)}\n"
    )
    if owner != "root":
        out.write(
            f"  note: the key is owned by {owner}, not root: workers read it as root before"
            f" they drop privileges; chown root:root {key_path}\n"
        )
    out.write(
        f"Next: install {cert_path} on the clients (`tproxy-twist ca show` says how)."
        f" Keep {key_path} secret: whoever has it can intercept those clients' TLS.\n"
    )
    return 0


def cmd_ca_show(args: argparse.Namespace, out: TextIO) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from .tls.ca import fingerprint, key_file_problem

    cert_path, key_path = _paths(args)
    try:
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificates(f.read())[0]
    except OSError as e:
        hint = (
            " (create one with `tproxy-twist ca init`)" if isinstance(e, FileNotFoundError) else ""
        )
        raise args.usage_error(f"tproxy-twist ca show: {cert_path}: {e.strerror}{hint}") from None
    except ValueError:
        raise args.usage_error(
            f"tproxy-twist ca show: {cert_path}: no PEM certificate in it"
        ) from None
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    if args.pem:
        out.write(pem)
        return 0
    try:
        st = os.stat(key_path)
    except OSError as e:
        key_state = f"{key_path}: {e.strerror}"
    else:
        problem = key_file_problem(st)
        key_state = f"{key_path}: mode {stat.S_IMODE(st.st_mode):04o}, owner {_owner(st.st_uid)}"
        key_state += f": PROBLEM: {problem}" if problem else ": ok"
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = f"CA:{str(constraints.ca).upper()}" + (
            f", pathlen {constraints.path_length}" if constraints.path_length is not None else ""
        )
    except x509.ExtensionNotFound:
        ca = "no basicConstraints: NOT a CA"
    out.write(
        f"certificate: {cert_path}\n"
        f"  subject:     {certificate.subject.rfc4514_string()}\n"
        f"  issuer:      {certificate.issuer.rfc4514_string()}\n"
        f"  valid:       {_day(certificate.not_valid_before_utc)}"
        f" to {_day(certificate.not_valid_after_utc)}\n"
        f"  constraints: {ca}\n"
        f"  SHA-256:     {fingerprint(certificate)}\n"
        f"key:           {key_state}\n\n"
    )
    out.write(INSTALL.format(cert=cert_path))
    out.write(pem)
    return 0


def _day(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
