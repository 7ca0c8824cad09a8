"""
The local CA: what `tproxy-twist ca init` makes, how its files are
written (the key never readable by others), what loading refuses, and what
`tproxy-twist ca show` prints.
"""

from __future__ import annotations

import datetime
import io
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tproxy_twist import cli
from tproxy_twist.tls.ca import (
    CAError,
    create_ca,
    fingerprint,
    key_file_problem,
    load_ca,
    write_ca,
)
from tproxy_twist.tls.testing import make_ca, make_server_cert, now_utc

REPO = Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def ca_files(tmp_path: Path) -> tuple[str, str]:
    key, certificate = create_ca("files test CA", NOW)
    cert_path, key_path = str(tmp_path / "ca.pem"), str(tmp_path / "ca.key")
    write_ca(key, certificate, cert_path, key_path)
    return cert_path, key_path


# --- the certificate ----------------------------------------------------------------------


def test_a_new_ca_is_an_ec_p256_ca_that_may_sign_leaves_only():
    key, certificate = create_ca("My CA", NOW)
    assert isinstance(key.curve, ec.SECP256R1)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert certificate.subject == certificate.issuer
    assert "CN=My CA" in certificate.subject.rfc4514_string()
    assert certificate.not_valid_before_utc < NOW
    assert certificate.not_valid_after_utc == NOW + datetime.timedelta(days=3650)
    certificate.verify_directly_issued_by(certificate)


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_a_ca_name_must_fit_a_common_name(name):
    with pytest.raises(ValueError):
        create_ca(name, NOW)


# --- writing ------------------------------------------------------------------------------


def test_the_key_is_written_mode_0600_and_the_certificate_0644(ca_files):
    cert_path, key_path = ca_files
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert_path).st_mode) == 0o644
    if os.geteuid() == 0:
        assert os.stat(key_path).st_uid == 0 and os.stat(key_path).st_gid == 0
    assert [p for p in os.listdir(os.path.dirname(key_path)) if p.startswith(".")] == []


def test_the_key_is_never_readable_by_others_even_while_it_is_written(tmp_path):
    """
    Watch the directory from another thread while the key is written with a
    permissive umask: every file that appears is mode 0600 when first seen.
    """
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    seen.setdefault(entry.name, stat.S_IMODE(entry.stat().st_mode))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    old_umask = os.umask(0)
    watcher.start()
    try:
        for i in range(20):
            key, certificate = create_ca("race", NOW)
            write_ca(key, certificate, str(tmp_path / f"c{i}.pem"), str(tmp_path / f"k{i}.key"))
    finally:
        stop.set()
        watcher.join()
        os.umask(old_umask)
    keys = {name: mode for name, mode in seen.items() if ".key" in name}  # temporary ones too
    assert keys and all(mode == 0o600 for mode in keys.values()), keys


def test_existing_files_are_not_replaced_without_force(ca_files):
    cert_path, key_path = ca_files
    before = Path(key_path).read_bytes(), Path(cert_path).read_bytes()
    key, certificate = create_ca("second", NOW)
    with pytest.raises(CAError, match="already exists; --force replaces it"):
        write_ca(key, certificate, cert_path, key_path)
    assert (Path(key_path).read_bytes(), Path(cert_path).read_bytes()) == before
    write_ca(key, certificate, cert_path, key_path, force=True)
    assert load_ca(cert_path, key_path, NOW).certificate == certificate
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


# --- loading ------------------------------------------------------------------------------


def test_a_written_ca_loads_back(ca_files):
    cert_path, key_path = ca_files
    ca = load_ca(cert_path, key_path, NOW)
    assert ca.chain == ()
    assert ca.subject_key_identifier.digest == (
        x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o601, 0o610])
def test_a_key_that_group_or_others_may_access_is_refused(ca_files, mode):
    cert_path, key_path = ca_files
    os.chmod(key_path, mode)
    with pytest.raises(CAError, match=rf"{key_path}: group or others have access .*chmod 600"):
        load_ca(cert_path, key_path, NOW)


def test_a_key_behind_a_symbolic_link_is_refused(ca_files, tmp_path):
    cert_path, key_path = ca_files
    link = tmp_path / "link.key"
    link.symlink_to(key_path)
    with pytest.raises(CAError, match="symbolic link"):
        load_ca(cert_path, str(link), NOW)


def test_a_key_that_is_not_the_certificates_is_refused(ca_files, tmp_path):
    cert_path, _ = ca_files
    other_key, other = create_ca("other", NOW)
    other_key_path = str(tmp_path / "other.key")
    write_ca(other_key, other, str(tmp_path / "other.pem"), other_key_path)
    with pytest.raises(CAError, match=rf"{other_key_path}: is not the key of the certificate"):
        load_ca(cert_path, other_key_path, NOW)


def test_a_server_certificate_is_not_accepted_as_a_ca(tmp_path):
    leaf = make_server_cert(["example.com"], make_ca())
    cert_path, key_path = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_path.write_bytes(leaf.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, leaf.key_pem)
    os.close(fd)
    with pytest.raises(CAError, match="not a CA certificate"):
        load_ca(str(cert_path), str(key_path), NOW)


def test_an_expired_ca_is_refused(ca_files):
    cert_path, key_path = ca_files
    with pytest.raises(CAError, match="expired on"):
        load_ca(cert_path, key_path, NOW + datetime.timedelta(days=3651))


def test_an_encrypted_key_is_refused(ca_files):
    cert_path, key_path = ca_files
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    Path(key_path).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CAError, match="encrypted"):
        load_ca(cert_path, key_path, NOW)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_missing_or_garbled_files_are_errors_naming_the_file(ca_files, which):
    cert_path, key_path = ca_files
    path = cert_path if which == "cert" else key_path
    Path(path).write_text("garbage\n")
    with pytest.raises(CAError, match=rf"^{path}: (no PEM|not a PEM)"):
        load_ca(cert_path, key_path, NOW)
    os.unlink(path)
    with pytest.raises(CAError, match=rf"^{path}: cannot read: No such file"):
        load_ca(cert_path, key_path, NOW)


def test_an_intermediate_cas_file_carries_its_chain(tmp_path):
    root = make_ca("root")
    intermediate = make_ca("intermediate", issuer=root, path_length=0)
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert_path.write_bytes(intermediate.cert_pem + root.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, intermediate.key_pem)
    os.close(fd)
    ca = load_ca(str(cert_path), str(key_path), datetime.datetime.now(datetime.UTC))
    assert ca.certificate == intermediate.certificate
    assert ca.chain == (root.certificate,)


def test_key_file_problems_name_the_mode():
    assert key_file_problem(os.stat_result((stat.S_IFREG | 0o600,) + (0,) * 9)) is None
    problem = key_file_problem(os.stat_result((stat.S_IFREG | 0o644,) + (0,) * 9))
    assert problem is not None and "0644" in problem
    assert key_file_problem(os.stat_result((stat.S_IFDIR | 0o700,) + (0,) * 9))


# --- the command --------------------------------------------------------------------------


def test_ca_init_writes_a_ca_and_prints_its_fingerprint(tmp_path):
    status, out, err = run("ca", "init", "--dir", str(tmp_path / "ca"), "--name", "Office CA")
    assert (status, err) == (0, "")
    ca = load_ca(str(tmp_path / "ca" / "ca.pem"), str(tmp_path / "ca" / "ca.key"), now_utc())
    assert "CN=Office CA" in out
    assert fingerprint(ca.certificate) in out
    assert "mode 0600" in out


def test_ca_init_refuses_to_replace_a_ca_unless_forced(tmp_path):
    assert run("ca", "init", "--dir", str(tmp_path))[0] == 0
    before = (tmp_path / "ca.key").read_bytes()
    status, out, err = run("ca", "init", "--dir", str(tmp_path))
    assert status == 2 and out == ""
    assert "already exists; --force replaces it" in err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert run("ca", "init", "--dir", str(tmp_path), "--force")[0] == 0
    assert (tmp_path / "ca.key").read_bytes() != before


def test_ca_init_writes_where_the_configuration_says(tmp_path):
    config = tmp_path / "tproxy.toml"
    config.write_text(
        f'[tls]\nca_cert = "{tmp_path}/my.pem"\nca_key = "{tmp_path}/secret/my.key"\n\n'
        '[[port]]\nlisten = "127.0.0.1:3128"\nmode = "forward"\n'
    )
    status, _, err = run("ca", "init", "--config", str(config))
    assert (status, err) == (0, "")
    load_ca(str(tmp_path / "my.pem"), str(tmp_path / "secret" / "my.key"), now_utc())


def test_ca_init_rejects_a_name_too_long_and_a_bad_validity(tmp_path):
    status, _, err = run("ca", "init", "--dir", str(tmp_path), "--name", "x" * 65)
    assert status == 2 and "--name" in err
    status, _, err = run("ca", "init", "--dir", str(tmp_path), "--days", "0")
    assert status == 2 and "--days" in err
    assert list(tmp_path.iterdir()) == []


def test_ca_show_prints_the_certificate_fingerprint_and_how_to_install_it(ca_files, tmp_path):
    cert_path, _ = ca_files
    status, out, err = run("ca", "show", "--dir", str(tmp_path))
    assert (status, err) == (0, "")
    certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert fingerprint(certificate) in out
    assert "CA:TRUE, pathlen 0" in out
    assert "update-ca-certificates" in out and "certutil -d sql:" in out
    assert "mode 0600" in out and ": ok" in out
    assert out.endswith(Path(cert_path).read_text())


def test_ca_show_warns_about_a_key_others_can_read(ca_files, tmp_path):
    _, key_path = ca_files
    os.chmod(key_path, 0o644)
    status, out, _ = run("ca", "show", "--dir", str(tmp_path))
    assert status == 0
    assert "PROBLEM: group or others have access (mode 0644)" in out


def test_ca_show_pem_prints_only_the_certificate(ca_files, tmp_path):
    cert_path, _ = ca_files
    status, out, _ = run("ca", "show", "--dir", str(tmp_path), "--pem")
    assert (status, out) == (0, Path(cert_path).read_text())


def test_ca_show_without_a_ca_says_how_to_make_one(tmp_path):
    status, out, err = run("ca", "show", "--dir", str(tmp_path))
    assert status == 2 and out == ""
    assert "tproxy-twist ca init" in err


def test_the_installed_command_runs_ca_init_and_show(tmp_path):
    """`python -m tproxy_twist.cli` (how the command runs from a checkout) as well."""
    argv = [sys.executable, "-m", "tproxy_twist.cli", "ca"]
    made = subprocess.run([*argv, "init", "--dir", str(tmp_path)], capture_output=True, cwd=REPO)
    assert made.returncode == 0, made.stderr
    again = subprocess.run([*argv, "init", "--dir", str(tmp_path)], capture_output=True, cwd=REPO)
    assert again.returncode == 2 and b"already exists" in again.stderr
    shown = subprocess.run(
        [*argv, "show", "--dir", str(tmp_path), "--pem"], capture_output=True, cwd=REPO
    )
    assert shown.stdout == (tmp_path / "ca.pem").read_bytes()
