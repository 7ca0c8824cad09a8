"""
TLS bump end to end: a real nginx TLS origin (certificates from a test CA
made here), `tproxy-twist rules` diverting tcp 443 and 4441-4443 to a TLS
port whose rules bump, the proxy's own CA made with `tproxy-twist ca init`,
and curl, openssl s_client, Python and headless Chromium in the client
namespace.

The origin's 443 has a good certificate (origin.test, *.many.test and its
addresses) and answers any SNI; 4441 names another host, 4442 is
self-signed, 4443 has expired.  The origin's 8443 (the good certificate) is
not diverted: the direct path to compare with.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tproxy_twist import config as C
from tproxy_twist.lab import TWISTD, Lab, cleanup_stale
from tproxy_twist.lab.topology import REPO_ROOT, child_env
from tproxy_twist.rules import render_for_config
from tproxy_twist.tls.testing import make_ca, make_server_cert, now_utc

NAME = "origin.test"
BAD_PORTS = {"wrong_name": 4441, "self_signed": 4442, "expired": 4443}
DIRECT_PORT = 8443
DENIED_PORT = 4444  # diverted, the good certificate, refused by deny_destinations
SILENT_PORT = 4445  # diverted, accepts TCP and never says a word
CONNECT_TIMEOUT = 3  # [timeouts] connect: the origin's TCP connection, then its handshake
BUMP_PORT = 3130
LEAF_CACHE_SIZE = 200
MANY = 5000
CLI = [sys.executable, "-m", "tproxy_twist.cli"]

PROXY_CONFIG = """\
workers = 1

[timeouts]
connect = {connect_timeout}

[access_log]
path = "{tmp}/access.log"
format = "json"

[metrics]
listen = "127.0.0.1:9464"

[tls]
ca_cert = "{tmp}/proxy-ca.pem"
ca_key = "{tmp}/proxy-ca.key"
ca_bundle = "{tmp}/origin-ca.pem"
leaf_cache_size = {cache}

[[port]]
name = "bump"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
divert = [443, 4441, 4442, 4443, 4444, 4445]
host_verify_strict = true
deny_destinations = ["*:4444"]
[port.tls]
default = "bump"
[[port.tls.rule]]
action = "splice"
sni = ["spliced.test"]
"""

NGINX = """\
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    log_format saw '$remote_addr $server_port "$ssl_server_name" $request_uri';
    access_log {tmp}/nginx-access.log saw;
    log_format reused '$request_uri $ssl_session_reused';
    access_log {tmp}/nginx-reused.log reused;
    ssl_session_cache shared:e2e:1m;  # as most origins: sessions can be resumed
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type text/html;
    server {{
        listen 443 ssl http2 default_server;
        listen [::]:443 ssl http2 default_server;
        listen {direct} ssl;
        listen [::]:{direct} ssl;
        listen {denied} ssl;
        ssl_certificate {tmp}/good.pem;
        ssl_certificate_key {tmp}/good.key;
        root {tmp}/www;
        location = /drop {{ return 444; }}
    }}
{bad}
}}
"""
BAD_SERVER = """\
    server {{
        listen {port} ssl;
        ssl_certificate {tmp}/{kind}.pem;
        ssl_certificate_key {tmp}/{kind}.key;
        root {tmp}/www;
    }}
"""


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, timeout=60, **kw)


def _fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


class BumpLab:
    def __init__(self, lab: Lab, tmp: Path, proxy: subprocess.Popen) -> None:
        self.lab = lab
        self.tmp = tmp
        self.proxy = proxy
        self.access_log = tmp / "access.log"

    def client(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return self.lab.run(self.lab.client, argv, check=False, timeout=timeout, **kw)

    def curl(self, *args: str, ca: bool = True) -> subprocess.CompletedProcess:
        trust = ["--cacert", str(self.tmp / "proxy-ca.pem")] if ca else []
        resolve = []
        for port in (443, DENIED_PORT, *BAD_PORTS.values()):
            resolve += ["--resolve", f"{NAME}:{port}:{Lab.ORIGIN4}"]
        return self.client(
            ["curl", "--silent", "--show-error", "--max-time", "20", *trust, *resolve, *args]
        )

    def s_client(self, port: int, *args: str) -> tuple[str, x509.Certificate]:
        """openssl s_client's report, and the certificate it was shown (the leaf)."""
        proc = self.client(
            ["openssl", "s_client", "-connect", f"{Lab.ORIGIN4}:{port}", *args], input=b""
        )
        out = proc.stdout.decode(errors="replace")
        pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
        assert pem, out + proc.stderr.decode(errors="replace")
        return out, x509.load_pem_x509_certificate(pem.group(0).encode())

    def metrics(self) -> str:
        out = self.lab.run(
            self.lab.router, ["curl", "-s", "--max-time", "10", "http://127.0.0.1:9464/metrics"]
        )
        return out.stdout.decode()

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{name}\{{{re.escape(want)}\}} (\S+)$" if labels else rf"^{name} (\S+)$"
        match = re.search(pattern, self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    def wait_metric(self, name: str, at_least: float, timeout: float = 15, **labels) -> float:
        """Workers hand their counts over a few times a second: wait for them."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def access_entries(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.access_log.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def wait_access_entry(self, predicate, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.access_entries():
                if predicate(entry):
                    return entry
            time.sleep(0.1)
        pytest.fail(f"no matching access log entry in {self.access_entries()[-20:]}")

    def origin_log(self) -> list[str]:
        try:
            return (self.tmp / "nginx-access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proxy.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def worker_rss(self) -> int:
        """The RSS of the (one) worker, in bytes."""
        (pid,) = self.worker_pids()
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    cleanup_stale()
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def bump(lab: Lab) -> Iterator[BumpLab]:
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.fail("the TLS e2e tests need nginx and openssl (apt install nginx openssl)")
    tmp = lab.tmpdir
    origin_ca = make_ca("tproxy-twist e2e origin CA")
    now = now_utc()
    certificates = {
        "good": make_server_cert([NAME, "*.many.test", Lab.ORIGIN4, Lab.ORIGIN6], origin_ca),
        "wrong_name": make_server_cert(["elsewhere.test"], origin_ca),
        "self_signed": make_server_cert([NAME], None),
        "expired": make_server_cert(
            [NAME],
            origin_ca,
            not_before=now - datetime.timedelta(days=90),
            not_after=now - datetime.timedelta(days=2),
        ),
    }
    (tmp / "origin-ca.pem").write_bytes(origin_ca.cert_pem)
    for kind, issued in certificates.items():
        (tmp / f"{kind}.pem").write_bytes(issued.cert_pem)
        (tmp / f"{kind}.key").write_bytes(issued.key_pem)
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("<html><body><p id=x>hello through bump</p></body></html>\n")
    bad = "".join(BAD_SERVER.format(port=p, kind=k, tmp=tmp) for k, p in BAD_PORTS.items())
    (tmp / "nginx.conf").write_text(
        NGINX.format(tmp=tmp, direct=DIRECT_PORT, denied=DENIED_PORT, bad=bad)
    )
    nginx_out = open(tmp / "nginx.out", "ab")
    lab.popen(lab.origin, ["nginx", "-c", str(tmp / "nginx.conf")], stdout=nginx_out,
              stderr=subprocess.STDOUT)  # fmt: skip
    for port in (443, DIRECT_PORT, DENIED_PORT, *BAD_PORTS.values()):
        lab.wait_port(lab.origin, Lab.ORIGIN4, port)
    # Reads what it is sent, answers nothing, closes after the peer's EOF.
    silent = (
        "import socket, threading\n"
        "def hold(c):\n"
        "    try:\n"
        "        while c.recv(65536):\n"
        "            pass\n"
        "    except OSError:\n"
        "        pass\n"
        "    c.close()\n"
        f"s = socket.create_server(('{Lab.ORIGIN4}', {SILENT_PORT}))\n"
        "while True:\n"
        "    threading.Thread(target=hold, args=(s.accept()[0],), daemon=True).start()\n"
    )
    lab.popen(lab.origin, [sys.executable, "-c", silent])
    lab.wait_port(lab.origin, Lab.ORIGIN4, SILENT_PORT)
    config_text = PROXY_CONFIG.format(
        tmp=tmp, cache=LEAF_CACHE_SIZE, connect_timeout=CONNECT_TIMEOUT
    )
    config_path = tmp / "proxy.toml"
    config_path.write_text(config_text)
    _run([*CLI, "ca", "init", "--config", str(config_path), "--name", "tproxy-twist e2e proxy CA"])
    lab.apply_rules(render_for_config(C.loads(config_text)))
    proxy_log = tmp / "proxy.log"
    with open(proxy_log, "ab") as log:
        proxy = lab.popen(
            lab.router,
            [*TWISTD, "-n", "--pidfile", str(tmp / "twistd.pid"), "tproxy", "--config",
             str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env(),
            start_new_session=True,
        )  # fmt: skip
    lab.wait_listening(lab.router, [BUMP_PORT, 9464], proxy, proxy_log)
    try:
        yield BumpLab(lab, tmp, proxy)
    finally:
        lab.stop_process(proxy, grace=10)
        nginx_out.close()


# --- the happy path -----------------------------------------------------------------------


def test_curl_trusting_the_proxy_ca_gets_the_page_and_the_log_has_the_https_url(bump):
    proc = bump.curl(f"https://{NAME}/")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"hello through bump" in proc.stdout
    entry = bump.wait_access_entry(lambda e: e["url"] == f"https://{NAME}/")
    assert (entry["method"], entry["status"], entry["client"]) == ("GET", 200, Lab.CLIENT4)
    # The origin saw the client's own address, the SNI and the request.
    assert f'{Lab.CLIENT4} 443 "{NAME}" /' in bump.origin_log()
    assert bump.wait_metric("tproxy_tls_connections_total", 1, port="bump", action="bump") >= 1
    assert bump.wait_metric("tproxy_tls_origin_verify_total", 1, port="bump", result="ok") >= 1
    assert (
        bump.wait_metric("tproxy_requests_total", 1, port="bump", mode="tproxy", method="GET",
                         code="200") >= 1
    )  # fmt: skip


def test_keep_alive_requests_over_one_bumped_connection_each_get_their_answer(bump):
    proc = bump.curl(f"https://{NAME}/", f"https://{NAME}/index.html", f"https://{NAME}/nothing",
                     "--write-out", "%{http_code} %{num_connects}\n")  # fmt: skip
    codes = [line.split() for line in proc.stdout.decode().splitlines() if line[:3].isdigit()]
    assert codes == [["200", "1"], ["200", "0"], ["404", "0"]], proc.stdout


def test_the_client_sees_a_leaf_from_the_proxy_ca_for_the_sni_with_http11(bump):
    out, leaf = bump.s_client(443, "-servername", NAME, "-alpn", "h2,http/1.1")
    proxy_ca = x509.load_pem_x509_certificate((bump.tmp / "proxy-ca.pem").read_bytes())
    assert leaf.issuer == proxy_ca.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert "ALPN protocol: http/1.1" in out
    assert "Verify return code: 0 (ok)" not in out  # s_client does not trust the proxy CA...
    out, _ = bump.s_client(443, "-servername", NAME, "-CAfile", str(bump.tmp / "proxy-ca.pem"))
    assert "Verify return code: 0 (ok)" in out  # ...a client that does, verifies the leaf


def test_without_sni_the_leaf_names_the_original_destination_address(bump):
    _, leaf = bump.s_client(443, "-noservername")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [Lab.ORIGIN4]
    assert not san.get_values_for_type(x509.DNSName)


def test_a_host_that_is_not_the_sni_is_misdirected_under_host_verify_strict(bump):
    proc = bump.curl("-H", "Host: other.test", "--write-out", "%{http_code}", "-o", "/dev/null",
                     f"https://{NAME}/")  # fmt: skip
    assert proc.stdout == b"421", (proc.stdout, proc.stderr)


def test_errors_the_proxy_makes_are_answered_inside_tls(bump):
    # The origin closes without answering (nginx's 444): the proxy's 502, encrypted.
    proc = bump.curl("--write-out", "%{http_code}", "-o", "/dev/null", f"https://{NAME}/drop")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"502"


def test_a_bumped_connection_gets_its_own_connect_line_besides_its_request_lines(bump):
    proc = bump.curl(f"https://{NAME}/index.html?connection-line", "-o", "/dev/null")
    assert proc.returncode == 0, proc.stderr.decode()
    request = bump.wait_access_entry(lambda e: e["url"].endswith("?connection-line"))
    line = bump.wait_access_entry(
        lambda e: e["method"] == "CONNECT" and e.get("action") == "bump"
        and e["bytes_out"] == request["bytes_out"] and e["client"] == Lab.CLIENT4
    )  # fmt: skip
    assert (line["url"], line["result"], line["status"]) == (f"{NAME}:443", "NONE", 200)
    assert (line["sni"], line["destination"]) == (NAME, f"{Lab.ORIGIN4}:443")
    assert line["tls_version"] == "TLSv1.3" and line["ech"] is False and "alpn" in line


def test_a_destination_the_port_rules_refuse_is_denied_before_any_origin_connection(bump):
    before = bump.metric("tproxy_rejected_total", port="bump", reason="destination")
    proc = bump.curl(f"https://{NAME}:{DENIED_PORT}/?refused")
    assert proc.returncode == 35, (proc.returncode, proc.stderr)  # a TLS alert, no certificate
    assert b"access denied" in proc.stderr.lower(), proc.stderr
    entry = bump.wait_access_entry(lambda e: e["url"] == f"{NAME}:{DENIED_PORT}")
    assert (entry["result"], entry["status"], entry["action"]) == ("TCP_DENIED", 403, "deny")
    assert (
        bump.wait_metric("tproxy_rejected_total", before + 1, port="bump", reason="destination")
        == before + 1
    )
    assert not [line for line in bump.origin_log() if f" {DENIED_PORT} " in line]


def test_the_next_bumped_connection_to_an_origin_resumes_the_verified_tls_session(bump):
    # Two connections one after the other: the second origin handshake resumes
    # the first one's session (nginx logs "r"), and both are served.
    for n in (1, 2):
        proc = bump.curl(f"https://{NAME}/index.html?resume-{n}", "-o", "/dev/null")
        assert proc.returncode == 0, proc.stderr.decode()
    reused = dict(line.split() for line in (bump.tmp / "nginx-reused.log").read_text().splitlines())
    assert reused["/index.html?resume-2"] == "r", reused


# --- origins that fail verification ---------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_PORTS))
def test_an_origin_that_fails_verification_is_spliced_and_never_gets_a_proxy_leaf(bump, kind):
    result = {"wrong_name": "bad_name", "self_signed": "unknown_issuer", "expired": "expired"}[kind]
    before = bump.metric("tproxy_tls_origin_verify_total", port="bump", result=result)
    _, shown = bump.s_client(BAD_PORTS[kind], "-servername", NAME)
    # The client sees the origin's own certificate and decides for itself.
    assert shown.fingerprint(hashes.SHA256()).hex() == _fingerprint(
        (bump.tmp / f"{kind}.pem").read_bytes()
    )
    assert (
        bump.wait_metric("tproxy_tls_origin_verify_total", before + 1, port="bump", result=result)
        == before + 1
    )
    proc = bump.curl(f"https://{NAME}:{BAD_PORTS[kind]}/")
    assert proc.returncode == 60, proc.stderr  # curl: the peer's certificate is not trusted


def test_an_origin_that_never_finishes_its_handshake_is_spliced_at_the_connect_timeout(bump):
    # The origin accepts the TCP connection and stays silent: after the connect
    # timeout its handshake has timed out, and the client is spliced (the hello
    # replayed to the same silent origin), never given a proxy-signed certificate.
    before = bump.metric("tproxy_tls_origin_verify_total", port="bump", result="timeout")
    proc = bump.client(
        ["timeout", str(CONNECT_TIMEOUT + 5), "openssl", "s_client", "-connect",
         f"{Lab.ORIGIN4}:{SILENT_PORT}", "-servername", NAME, "-ign_eof"],
        input=b"",
    )  # fmt: skip
    assert b"BEGIN CERTIFICATE" not in proc.stdout
    assert (
        bump.wait_metric(
            "tproxy_tls_origin_verify_total", before + 1, port="bump", result="timeout"
        )
        == before + 1
    )
    entry = bump.wait_access_entry(
        lambda e: e["url"] == f"{NAME}:{SILENT_PORT}" and e.get("action") == "splice"
    )
    assert entry["client"] == Lab.CLIENT4


def test_a_client_offering_only_h2_is_spliced(bump):
    out, shown = bump.s_client(443, "-servername", NAME, "-alpn", "h2")
    assert "ALPN protocol: h2" in out  # the origin's own answer: bumping speaks only http/1.1
    assert shown.fingerprint(hashes.SHA256()).hex() == _fingerprint(
        (bump.tmp / "good.pem").read_bytes()
    )
    entry = bump.wait_access_entry(lambda e: e.get("alpn") == "h2" and e["method"] == "CONNECT")
    assert entry["result"] == "TCP_TUNNEL"


def test_a_spliced_sni_rule_still_splices_on_a_bump_port(bump):
    _, shown = bump.s_client(443, "-servername", "spliced.test")
    assert shown.fingerprint(hashes.SHA256()).hex() == _fingerprint(
        (bump.tmp / "good.pem").read_bytes()
    )


def test_a_client_without_the_proxy_ca_refuses_and_is_counted(bump):
    before = bump.metric("tproxy_tls_client_cert_rejected_total", port="bump")
    proc = bump.curl(f"https://{NAME}/", ca=False)
    assert proc.returncode == 60, proc.stderr
    assert bump.wait_metric("tproxy_tls_client_cert_rejected_total", before + 1,
                            port="bump") == before + 1  # fmt: skip


# --- many hosts -------------------------------------------------------------------------------

MANY_SNIS = textwrap.dedent(
    """
    import concurrent.futures, socket, ssl, sys
    context = ssl.create_default_context(cafile=sys.argv[1])
    host, start, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    def one(i):
        name = f"h{i}.many.test"
        for attempt in range(3):
            try:
                with socket.create_connection((host, 443), timeout=30) as sock:
                    with context.wrap_socket(sock, server_hostname=name) as tls:
                        return tls.getpeercert()["subjectAltName"] == (("DNS", name),)
            except OSError:
                if attempt == 2:
                    raise
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        print(sum(pool.map(one, range(start, start + count))))
    """
)


def _bump_many(bump: BumpLab, start: int, count: int) -> int:
    proc = bump.client(
        [sys.executable, "-c", MANY_SNIS, str(bump.tmp / "proxy-ca.pem"), Lab.ORIGIN4,
         str(start), str(count)],
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return int(proc.stdout)


def test_thousands_of_hosts_leave_the_leaf_cache_at_its_cap_and_the_rss_bounded(bump):
    warm = MANY // 5
    assert _bump_many(bump, 0, warm) == warm  # each got a leaf for exactly its own name
    rss_warm = bump.worker_rss()
    assert _bump_many(bump, warm, MANY - warm) == MANY - warm
    rss_after = bump.worker_rss()
    assert bump.wait_metric("tproxy_tls_leaf_cache_entries", LEAF_CACHE_SIZE) == LEAF_CACHE_SIZE
    evictions = bump.wait_metric("tproxy_tls_leaf_cache_total", MANY - LEAF_CACHE_SIZE,
                                 result="eviction")  # fmt: skip
    assert evictions >= MANY - LEAF_CACHE_SIZE
    # 4,000 more leaves of about 5.5 KB each would be 22 MB; the cache keeps 200.
    assert rss_after - rss_warm < 10 * 1024 * 1024, (rss_warm, rss_after)
    print(f"worker RSS after {warm} hosts {rss_warm / 2**20:.1f} MiB,"
          f" after {MANY} {rss_after / 2**20:.1f} MiB")  # fmt: skip


# --- the CA key ---------------------------------------------------------------------------------


def test_the_ca_key_is_root_only_and_a_readable_one_stops_the_start(bump, tmp_path):
    key = bump.tmp / "proxy-ca.key"
    info = key.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    # The same configuration with a copy of the key that others may read.
    loose = tmp_path / "loose.key"
    shutil.copy(key, loose)
    os.chmod(loose, 0o644)
    text = (bump.tmp / "proxy.toml").read_text().replace(str(key), str(loose))
    text = text.replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:9465"')
    text = text.replace('listen = "[::]:3130"', 'listen = "[::]:3140"')
    config = tmp_path / "loose.toml"
    config.write_text(text)
    proc = bump.lab.run(
        bump.lab.router,
        [*TWISTD, "-n", "--pidfile", str(tmp_path / "twistd.pid"), "tproxy", "--config",
         str(config)],
        check=False, timeout=60,
    )  # fmt: skip
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode != 0, output
    assert f"{config}: tls.ca_key: " in output and "chmod 600" in output, output


# --- a browser ------------------------------------------------------------------------------------


def test_headless_chromium_trusting_the_proxy_ca_loads_a_page_through_bump(bump):
    if shutil.which("chromium") is None or shutil.which("certutil") is None:
        pytest.fail("needs chromium and certutil (apt install chromium libnss3-tools)")
    home = bump.tmp / "chromium-home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    _run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"])
    _run(["certutil", "-d", f"sql:{nssdb}", "-A", "-n", "tproxy-twist e2e proxy CA", "-t", "C,,",
          "-i", str(bump.tmp / "proxy-ca.pem")])  # fmt: skip
    argv = [
        "env", f"HOME={home}", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={home / 'profile'}",
        f"--host-resolver-rules=MAP {NAME} {Lab.ORIGIN4}",
        "--virtual-time-budget=5000", "--dump-dom", f"https://{NAME}/?chromium",
    ]  # fmt: skip
    proc = bump.client(argv, timeout=180)
    stderr = proc.stderr.decode(errors="replace")[-3000:]
    assert "hello through bump" in proc.stdout.decode(), stderr
    entry = bump.wait_access_entry(lambda e: e["url"] == f"https://{NAME}/?chromium")
    assert (entry["status"], entry["client"]) == (200, Lab.CLIENT4)


# --- reload ---------------------------------------------------------------------------------------


def test_a_reload_with_a_key_others_may_read_is_refused_and_bumping_goes_on(bump):
    key = bump.tmp / "proxy-ca.key"
    log = bump.tmp / "proxy.log"
    before = log.read_text(errors="replace").count("reload refused")
    os.chmod(key, 0o644)
    try:
        bump.proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while log.read_text(errors="replace").count("reload refused") == before:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        assert "tls.ca_key" in log.read_text(errors="replace").split("reload refused")[-1]
    finally:
        os.chmod(key, 0o600)
    proc = bump.curl(f"https://{NAME}/")
    assert proc.returncode == 0 and b"hello through bump" in proc.stdout, proc.stderr
    # With the key safe again, a reload starts new workers, and they bump.
    old_workers = set(bump.worker_pids())
    bump.proxy.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not (bump.worker_pids() and not old_workers & set(bump.worker_pids())):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    proc = bump.curl(f"https://{NAME}/?after-reload")
    assert proc.returncode == 0 and b"hello through bump" in proc.stdout, proc.stderr
    bump.wait_access_entry(lambda e: e["url"] == f"https://{NAME}/?after-reload")
