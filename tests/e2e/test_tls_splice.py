"""
TLS on intercepted ports, end to end: a real nginx TLS origin (its
certificate from a test CA made here with openssl), `tproxy-twist rules`
diverting tcp 443 and 4443 to two TLS ports and rejecting QUIC, the proxy in
the router namespace, and curl, openssl s_client, Python and headless
Chromium in the client namespace.

Port 443 goes to TLS port "strict" (no SNI: deny, not TLS: close, a short
client_hello_timeout, rule: deny denied.test, streams spliced); 4443 to TLS
port "lenient" (no SNI: splice, not TLS: tunnel, streams copied: the
default).  The origin's 8443 is not diverted: the direct path to compare
with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy_twist import config as C
from tproxy_twist.lab import TWISTD, Lab, cleanup_stale
from tproxy_twist.lab.topology import REPO_ROOT, child_env
from tproxy_twist.rules import render_for_config

ORIGIN_NAME = "origin.test"
DIRECT_PORT = 8443
STRICT_PORT, LENIENT_PORT = 3130, 3131
LENIENT_DIVERT = 4443  # the destination port diverted to "lenient"
BIG_SIZE = 20 * 1024 * 1024

PROXY_CONFIG = """\
workers = 1
drain_timeout = 30.0

[access_log]
path = "{access_log}"
format = "json"

[metrics]
listen = "127.0.0.1:9464"

[[port]]
name = "strict"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
divert = [443]
on_not_tls = "close"
client_hello_timeout = 1.0
stream_relay = "splice"
[port.tls]
default = "splice"
no_sni = "deny"
[[port.tls.rule]]
action = "deny"
sni = ["denied.test", ".blocked.test"]

[[port]]
name = "lenient"
listen = "[::]:3131"
mode = "tproxy"
protocol = "tls"
divert = [4443]
on_not_tls = "tunnel"
[port.tls]
no_sni = "splice"
"""

NGINX_CONFIG = """\
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    log_format tls '$remote_addr $server_port "$ssl_server_name" $request_uri';
    access_log {tmp}/nginx-access.log tls;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type text/html;
    server {{
        listen 443 ssl;
        listen [::]:443 ssl;
        listen 4443 ssl;
        listen [::]:4443 ssl;
        listen 8443 ssl;
        listen [::]:8443 ssl;
        ssl_certificate {tmp}/origin.pem;
        ssl_certificate_key {tmp}/origin.key;
        root {tmp}/www;
    }}
}}
"""


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, timeout=60, **kw)


def make_test_ca(tmp: Path) -> None:
    """A test CA and an origin certificate it signed (names and IPs of the lab origin)."""
    _run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp / "ca.key"), "-out", str(tmp / "ca.pem"), "-days", "2",
         "-subj", "/CN=tproxy-twist e2e test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    )  # fmt: skip
    _run(
        ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(tmp / "origin.key"), "-out", str(tmp / "origin.csr"),
         "-subj", f"/CN={ORIGIN_NAME}"]
    )  # fmt: skip
    (tmp / "origin.ext").write_text(
        f"subjectAltName=DNS:{ORIGIN_NAME},DNS:denied.test,IP:{Lab.ORIGIN4},IP:{Lab.ORIGIN6}\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    _run(
        ["openssl", "x509", "-req", "-in", str(tmp / "origin.csr"), "-CA", str(tmp / "ca.pem"),
         "-CAkey", str(tmp / "ca.key"), "-CAcreateserial", "-out", str(tmp / "origin.pem"),
         "-days", "2", "-extfile", str(tmp / "origin.ext")]
    )  # fmt: skip


class TLSLab:
    """The lab, its origin's files, and the running proxy."""

    def __init__(self, lab: Lab, tmp: Path, proxy: subprocess.Popen, proxy_log: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.proxy = proxy
        self.proxy_log = proxy_log
        self.access_log = tmp / "access.log"

    def client(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return self.lab.run(self.lab.client, argv, check=False, timeout=timeout, **kw)

    def python(self, code: str, *args: str, timeout: float = 60) -> str:
        proc = self.client([sys.executable, "-c", code, *args], timeout=timeout)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return proc.stdout.decode()

    def origin_log(self) -> list[str]:
        try:
            return (self.tmp / "nginx-access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def origin_syns(self) -> int:
        """TCP SYNs the origin has received on the diverted ports (an nftables counter)."""
        out = self.lab.run(self.lab.origin, ["nft", "-j", "list", "table", "inet", "syns"])
        for item in json.loads(out.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        return expr["counter"]["packets"]
        raise AssertionError("no counter in the origin's syns table")

    def metrics(self) -> str:
        time.sleep(0.5)  # workers hand their counts over a few times a second
        out = self.lab.run(
            self.lab.router, ["curl", "-s", "--max-time", "10", "http://127.0.0.1:9464/metrics"]
        )
        return out.stdout.decode()

    def metric(self, name: str, **labels: str) -> float:
        text = self.metrics()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

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
        pytest.fail(f"no matching access log entry in {self.access_entries()}")

    def fingerprint(self, host: str, port: int, *extra: str) -> str:
        """The SHA-256 fingerprint of the certificate openssl s_client is shown."""
        proc = self.client(
            ["openssl", "s_client", "-connect", f"{host}:{port}", *extra],
            input=b"",
        )
        pem = re.search(
            rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", proc.stdout, re.S
        )
        assert pem, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        out = _run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem.group(0))
        return out.stdout.decode().strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """This module's own lab: its rules divert 443 and 4443 to the TLS ports (and reject QUIC)."""
    cleanup_stale()
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def tls(lab: Lab) -> Iterator[TLSLab]:
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.fail("the TLS e2e tests need nginx and openssl (apt install nginx openssl)")
    tmp = lab.tmpdir
    make_test_ca(tmp)
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("<html><body><p id=x>hello through tls</p></body></html>\n")
    with open(www / "big", "wb") as f:
        f.write(os.urandom(BIG_SIZE))
    (tmp / "nginx.conf").write_text(NGINX_CONFIG.format(tmp=tmp))
    nginx_log = open(tmp / "nginx.out", "ab")
    lab.popen(lab.origin, ["nginx", "-c", str(tmp / "nginx.conf")], stdout=nginx_log,
              stderr=subprocess.STDOUT)  # fmt: skip
    for port in (443, 4443, DIRECT_PORT):
        lab.wait_port(lab.origin, Lab.ORIGIN4, port)
    # Count SYNs reaching the origin on the diverted ports.
    lab.run(
        lab.origin,
        ["nft", "-f", "-"],
        input=b"table inet syns {\n chain input {\n type filter hook input priority 0;\n"
        b" tcp dport { 443, 4443 } tcp flags & (syn | ack) == syn counter\n }\n}\n",
    )
    config_text = PROXY_CONFIG.format(access_log=tmp / "access.log")
    config_path = tmp / "proxy.toml"
    config_path.write_text(config_text)
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
    lab.wait_listening(lab.router, [STRICT_PORT, LENIENT_PORT, 9464], proxy, proxy_log)
    try:
        yield TLSLab(lab, tmp, proxy, proxy_log)
    finally:
        lab.stop_process(proxy, grace=10)
        nginx_log.close()


def curl(tls: TLSLab, *args: str) -> subprocess.CompletedProcess:
    return tls.client(
        ["curl", "--silent", "--show-error", "--max-time", "20", "--cacert",
         str(tls.tmp / "ca.pem"), *args]
    )  # fmt: skip


# --- passthrough ------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [Lab.ORIGIN4, Lab.ORIGIN6], ids=["ipv4", "ipv6"])
def test_spliced_https_reaches_the_origin_from_the_clients_own_address(tls, origin):
    address = f"[{origin}]" if ":" in origin else origin
    client = Lab.CLIENT6 if ":" in origin else Lab.CLIENT4
    proc = curl(tls, "--resolve", f"{ORIGIN_NAME}:443:{address}", f"https://{ORIGIN_NAME}/")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"hello through tls" in proc.stdout
    assert f'{client} 443 "{ORIGIN_NAME}" /' in tls.origin_log()
    entry = tls.wait_access_entry(
        lambda e: e["client"] == client and e["url"] == f"{ORIGIN_NAME}:443"
    )
    assert (entry["method"], entry["result"], entry["status"]) == ("CONNECT", "TCP_TUNNEL", 200)
    assert entry["sni"] == ORIGIN_NAME and entry["tls_version"] == "TLSv1.3"
    assert "http/1.1" in entry["alpn"].split(",") and entry["ech"] is False


def test_the_client_sees_the_origins_own_certificate(tls):
    diverted = tls.fingerprint(Lab.ORIGIN4, 443, "-servername", ORIGIN_NAME)
    direct = tls.fingerprint(Lab.ORIGIN4, DIRECT_PORT, "-servername", ORIGIN_NAME)
    assert diverted == direct
    assert tls.fingerprint(f"[{Lab.ORIGIN6}]", 443, "-servername", ORIGIN_NAME) == direct
    assert tls.metric("tproxy_tls_connections_total", port="strict", action="splice") >= 2


@pytest.mark.parametrize(
    ("port", "destination_port", "how"),
    [("strict", 443, "splice"), ("lenient", LENIENT_DIVERT, "copy")],
    ids=["stream_relay-splice", "stream_relay-copy-by-default"],
)
def test_a_download_is_relayed_intact_as_the_ports_stream_relay_says_and_counted(
    tls, port, destination_port, how
):
    other = "copy" if how == "splice" else "splice"
    before = {h: tls.metric("tproxy_streams_total", port=port, how=h) for h in (how, other)}
    sent_out = tls.metric("tproxy_bytes_total", port=port, direction="out")
    target = tls.tmp / f"big.{how}"
    proc = curl(
        tls, "--resolve", f"{ORIGIN_NAME}:{destination_port}:{Lab.ORIGIN4}", "-o", str(target),
        f"https://{ORIGIN_NAME}:{destination_port}/big",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert target.read_bytes() == (tls.tmp / "www" / "big").read_bytes()
    target.unlink()
    # Spliced (zero-copy) or copied through the worker's pump as the port says,
    # and every byte counted either way.
    assert tls.metric("tproxy_streams_total", port=port, how=how) == before[how] + 1
    assert tls.metric("tproxy_streams_total", port=port, how=other) == before[other]
    assert tls.metric("tproxy_bytes_total", port=port, direction="out") > sent_out + BIG_SIZE
    url = f"{ORIGIN_NAME}:{destination_port}"
    entry = tls.wait_access_entry(lambda e: e["url"] == url and e["bytes_out"] > BIG_SIZE)
    assert entry["bytes_in"] > 0 and entry["status"] == 200


# --- deny, no SNI -------------------------------------------------------------------------


def test_a_denied_sni_gets_the_access_denied_alert_and_the_origin_sees_nothing(tls):
    before = tls.origin_syns()
    proc = tls.client(
        ["openssl", "s_client", "-connect", f"{Lab.ORIGIN4}:443", "-servername", "x.blocked.test"],
        input=b"",
    )
    assert b"alert access denied" in proc.stderr or b"alert number 49" in proc.stderr, proc.stderr
    assert tls.origin_syns() == before
    assert tls.metric("tproxy_tls_rejected_total", port="strict", reason="denied") >= 1
    entry = tls.wait_access_entry(lambda e: e.get("sni") == "x.blocked.test")
    assert (entry["result"], entry["status"]) == ("TCP_DENIED", 403)


def test_a_hello_without_sni_is_denied_or_spliced_as_the_port_says(tls):
    before = tls.origin_syns()
    proc = tls.client(
        ["openssl", "s_client", "-connect", f"{Lab.ORIGIN4}:443", "-noservername"], input=b""
    )
    assert b"alert access denied" in proc.stderr or b"alert number 49" in proc.stderr
    assert tls.origin_syns() == before
    assert tls.metric("tproxy_tls_rejected_total", port="strict", reason="no_sni") >= 1
    spliced = tls.fingerprint(Lab.ORIGIN4, 4443, "-noservername")
    assert spliced == tls.fingerprint(Lab.ORIGIN4, DIRECT_PORT, "-noservername")
    assert tls.origin_syns() == before + 1


# --- hellos in pieces -----------------------------------------------------------------------

SPLIT_CLIENT = textwrap.dedent(
    """
    import socket, ssl, sys, time
    ca, host, port, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "big"
    context = ssl.create_default_context(cafile=ca)
    alpn = ["http/1.1"] + (["x" * 200 + str(i) for i in range(10)] if big else [])
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="origin.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    first = outgoing.read()
    assert first[0] == 0x16, first[:5]
    body = first[5:]
    cut = len(body) // 2
    record = lambda part: first[:3] + len(part).to_bytes(2, "big") + part
    sock = socket.create_connection((host, port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(record(body[:cut]))  # one TCP segment, one record: half a hello
    time.sleep(0.2)
    sock.sendall(record(body[cut:]))
    print("hello", len(first))
    while True:
        data = sock.recv(65536)
        if not data:
            sys.exit("closed during the handshake")
        incoming.write(data)
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
    sock.sendall(outgoing.read())
    tls.write(b"GET / HTTP/1.1\\r\\nHost: origin.test\\r\\nConnection: close\\r\\n\\r\\n")
    sock.sendall(outgoing.read())
    answer = b""
    while b"hello through tls" not in answer:
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
        try:
            answer += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    print(answer.split(b"\\r\\n")[0].decode())
    print("body ok" if b"hello through tls" in answer else "no body")
    """
)


@pytest.mark.parametrize("size", ["small", "big"])
def test_a_hello_split_over_two_segments_and_records_with_a_gap_is_spliced(tls, size):
    out = tls.python(SPLIT_CLIENT, str(tls.tmp / "ca.pem"), Lab.ORIGIN4, "443", size)
    lines = out.splitlines()
    hello_size = int(lines[0].split()[1])
    if size == "big":
        assert hello_size > 1500
    assert lines[1:] == ["HTTP/1.1 200 OK", "body ok"]


# --- not TLS, silence -------------------------------------------------------------------------

PLAIN_CLIENT = textwrap.dedent(
    """
    import socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    sock.sendall(b"GET / HTTP/1.1\\r\\nHost: origin.test\\r\\nConnection: close\\r\\n\\r\\n")
    answer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    print(repr(answer[:200]))
    """
)


def test_plain_http_on_a_close_port_is_closed_without_reaching_the_origin(tls):
    before = tls.origin_syns()
    assert tls.python(PLAIN_CLIENT, Lab.ORIGIN4, "443").strip() == "b''"
    assert tls.origin_syns() == before
    assert tls.metric("tproxy_tls_rejected_total", port="strict", reason="not_tls") >= 1


def test_plain_http_on_a_tunnel_port_reaches_the_origin(tls):
    answer = tls.python(PLAIN_CLIENT, Lab.ORIGIN4, "4443")
    # nginx itself answers: plain HTTP reached its TLS port through the tunnel.
    assert "400 Bad Request" in answer and "The plain HTTP request" in answer
    assert tls.metric("tproxy_tls_connections_total", port="lenient", action="tunnel") >= 1


SILENT_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    sock = socket.create_connection((sys.argv[1], 443), timeout=30)
    start = time.monotonic()
    data = sock.recv(100)
    print(repr(data), round(time.monotonic() - start, 1))
    """
)


SILENT_ORIGIN_CLIENT = textwrap.dedent(
    """
    import socket, ssl, sys, time
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection((sys.argv[1], 443), timeout=60)
    started = time.monotonic()
    try:
        context.wrap_socket(sock, server_hostname="origin.test")
        print("handshake")
    except (OSError, ssl.SSLError):
        print("ended", round(time.monotonic() - started))
    """
)


def test_an_origin_that_never_answers_is_given_up_at_the_connect_timeout(tls):
    # The origin drops the spoofed SYNs: the splice gives up after [timeouts]
    # connect (10 s by default), resets the client, counts it and logs a 504.
    before = tls.metric("tproxy_upstream_errors_total", port="strict", reason="timeout")
    tls.lab.run(
        tls.lab.origin,
        ["nft", "-f", "-"],
        input=b"table inet blackhole {\n chain input {\n type filter hook input priority -10;\n"
        b" ip saddr 198.51.100.2 tcp dport 443 drop\n }\n}\n",
    )
    try:
        out = tls.python(SILENT_ORIGIN_CLIENT, Lab.ORIGIN4)
    finally:
        tls.lab.run(tls.lab.origin, ["nft", "delete", "table", "inet", "blackhole"])
    word, seconds = out.split()
    assert word == "ended" and 9 <= int(seconds) <= 30, out
    after = tls.metric("tproxy_upstream_errors_total", port="strict", reason="timeout")
    assert after == before + 1
    entry = tls.wait_access_entry(lambda e: e["status"] == 504)
    assert entry["client"] == Lab.CLIENT4 and entry["sni"] == ORIGIN_NAME


LEAVING_CLIENT = textwrap.dedent(
    """
    import socket, ssl, struct, sys, time
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="origin.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    sock = socket.create_connection((sys.argv[1], 443), timeout=10)
    sock.sendall(outgoing.read())  # the hello: the proxy starts connecting
    time.sleep(0.3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset while the upstream connection is still being made
    print("left")
    """
)


def _blackhole_syns(tls) -> int:
    out = tls.lab.run(tls.lab.origin, ["nft", "-j", "list", "table", "inet", "blackhole2"])
    for item in json.loads(out.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return expr["counter"]["packets"]
    raise AssertionError("no counter in the blackhole table")


def test_a_client_leaving_while_the_splice_connects_calls_the_attempt_off(tls):
    # The origin drops the spoofed SYNs (counting them): the client resets while
    # the proxy is still connecting; the proxy gives the attempt up at once (no
    # SYN retransmitted a second and three seconds later) and logs the connection.
    tls.lab.run(
        tls.lab.origin,
        ["nft", "-f", "-"],
        input=b"table inet blackhole2 {\n chain input {\n type filter hook input priority -10;\n"
        b" ip saddr 198.51.100.2 tcp dport 443 tcp flags & (syn | ack) == syn counter drop\n"
        b" }\n}\n",
    )
    try:
        logged = len(tls.access_entries())
        assert tls.python(LEAVING_CLIENT, Lab.ORIGIN4).strip() == "left"
        deadline = time.monotonic() + 15
        while len(tls.access_entries()) == logged and time.monotonic() < deadline:
            time.sleep(0.1)
        (entry,) = tls.access_entries()[logged:]  # this connection's, once it ended
        assert (entry["client"], entry["status"], entry.get("action")) == (
            Lab.CLIENT4,
            0,
            "splice",
        )
        assert entry["sni"] == ORIGIN_NAME and entry["destination"] is None
        sent = _blackhole_syns(tls)
        assert sent >= 1  # the attempt was made
        time.sleep(3.5)  # proving an absence: SYN retries would come 1 s and 3 s after the first
        assert _blackhole_syns(tls) == sent
    finally:
        tls.lab.run(tls.lab.origin, ["nft", "delete", "table", "inet", "blackhole2"])


@pytest.mark.parametrize("origin", [Lab.ORIGIN4, Lab.ORIGIN6], ids=["ipv4", "ipv6"])
def test_an_origin_that_refuses_resets_the_client_at_once_and_is_counted(tls, origin):
    # The origin answers the spoofed SYN with a reset: the splice's connect is
    # refused, the client is reset at once, a 502 is logged and counted.
    client = Lab.CLIENT6 if ":" in origin else Lab.CLIENT4
    family = "ip6" if ":" in origin else "ip"
    before = tls.metric("tproxy_upstream_errors_total", port="strict", reason="refused")
    tls.lab.run(
        tls.lab.origin,
        ["nft", "-f", "-"],
        input=f"table inet refuse {{\n chain input {{\n type filter hook input priority -10;\n"
        f" {family} saddr {client} tcp dport 443 reject with tcp reset\n }}\n}}\n".encode(),
    )
    try:
        out = tls.python(SILENT_ORIGIN_CLIENT, origin)
    finally:
        tls.lab.run(tls.lab.origin, ["nft", "delete", "table", "inet", "refuse"])
    word, seconds = out.split()
    assert word == "ended" and int(seconds) < 5, out
    after = tls.metric("tproxy_upstream_errors_total", port="strict", reason="refused")
    assert after == before + 1
    entry = tls.wait_access_entry(lambda e: e["status"] == 502 and e["client"] == client)
    assert entry["sni"] == ORIGIN_NAME and entry["result"] == "NONE"


def test_a_silent_client_is_closed_at_client_hello_timeout(tls):
    before = tls.metric("tproxy_tls_rejected_total", port="strict", reason="timeout")
    data, waited = tls.python(SILENT_CLIENT, Lab.ORIGIN4).split()
    assert data == "b''"
    assert float(waited) >= 0.9  # not before the 1 s client_hello_timeout
    assert tls.metric("tproxy_tls_rejected_total", port="strict", reason="timeout") == before + 1


MANY_CLIENTS = textwrap.dedent("""
    import socket, ssl, struct, sys
    context = ssl.create_default_context(cafile=sys.argv[2])
    done = 0
    for n in range(int(sys.argv[3])):
        raw = socket.create_connection((sys.argv[1], 443), timeout=20)
        s = context.wrap_socket(raw, server_hostname="origin.test")
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: origin.test\\r\\nConnection: close\\r\\n\\r\\n")
        if b"hello through tls" in s.recv(4096):
            done += 1
        if n % 2:  # half of them leave with a reset, as a killed browser tab does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print(done)
""")


def test_many_spliced_connections_ending_in_resets_add_no_log_line_each(tls):
    lines_before = len(tls.proxy_log.read_text(errors="replace").splitlines())
    done = tls.python(MANY_CLIENTS, Lab.ORIGIN4, str(tls.tmp / "ca.pem"), "60")
    assert done.strip() == "60"
    tls.wait_access_entry(lambda e: e["client"] == Lab.CLIENT4)  # the workers are past them
    added = tls.proxy_log.read_text(errors="replace").splitlines()[lines_before:]
    # Sixty connection ends are nothing to tell an operator: no line per connection.
    assert len(added) < 10, added


# --- reload ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "destination_port", [443, LENIENT_DIVERT], ids=["stream_relay-splice", "stream_relay-copy"]
)
def test_a_spliced_download_survives_a_reload(tls, destination_port):
    where = f"{ORIGIN_NAME}:{destination_port}"
    download = tls.lab.popen(
        tls.lab.client,
        ["curl", "--silent", "--show-error", "--max-time", "60", "--limit-rate", "4M",
         "--cacert", str(tls.tmp / "ca.pem"), "--resolve", f"{where}:{Lab.ORIGIN4}",
         "-o", "/dev/null", "-w", "%{size_download} %{http_code}", f"https://{where}/big"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Under way through the proxy: a TPROXY-accepted socket's local port is the
    # original destination's.
    accepted = ["ss", "-Htn", "state", "established", "sport", "=", f":{destination_port}"]
    deadline = time.monotonic() + 20
    while not tls.lab.run(tls.lab.router, accepted, check=False).stdout.strip():
        assert time.monotonic() < deadline, "the download never reached the proxy"
        time.sleep(0.1)
    drained = tls.proxy_log.read_text().count("draining")
    os.kill(tls.proxy.pid, signal.SIGHUP)
    out, err = download.communicate(timeout=90)
    assert out.decode() == f"{BIG_SIZE} 200", err.decode()
    # The old worker drained meanwhile.
    assert tls.proxy_log.read_text().count("draining") > drained
    # The new generation serves new connections.
    proc = curl(tls, "--resolve", f"{where}:{Lab.ORIGIN4}", f"https://{where}/")
    assert b"hello through tls" in proc.stdout


# --- a browser ---------------------------------------------------------------------------------


def test_headless_chromium_loads_an_https_page_through_the_transparent_path(tls):
    if shutil.which("chromium") is None or shutil.which("certutil") is None:
        pytest.fail("needs chromium and certutil (apt install chromium libnss3-tools)")
    home = tls.tmp / "chromium-home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    _run(["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"])
    _run(["certutil", "-d", f"sql:{nssdb}", "-A", "-n", "tproxy-twist e2e CA", "-t", "C,,",
          "-i", str(tls.tmp / "ca.pem")])  # fmt: skip
    argv = [
        "env", f"HOME={home}", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={home / 'profile'}",
        f"--host-resolver-rules=MAP {ORIGIN_NAME} {Lab.ORIGIN4}",
        "--virtual-time-budget=5000", "--dump-dom", f"https://{ORIGIN_NAME}/",
    ]  # fmt: skip
    proc = tls.client(argv, timeout=180)
    assert "hello through tls" in proc.stdout.decode(), proc.stderr.decode(errors="replace")[-3000:]
    entry = tls.wait_access_entry(
        lambda e: e.get("sni") == ORIGIN_NAME and "h2" in (e.get("alpn") or "").split(",")
    )
    assert entry["result"] == "TCP_TUNNEL" and entry["client"] == Lab.CLIENT4


UDP_ECHO = textwrap.dedent(
    """
    import socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 443))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(b"echo", peer)
    """
)

QUIC_CLIENT = textwrap.dedent(
    """
    import socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.connect((sys.argv[1], int(sys.argv[2])))
    sock.send(b"\\xc0" + b"\\x00" * 1199)  # shaped like a QUIC Initial
    try:
        print(sock.recv(100).decode())
    except ConnectionRefusedError:
        print("refused")
    """
)


def test_quic_from_the_client_is_rejected_by_the_router(tls):
    lab = tls.lab
    # The kernel rate-limits the ICMP errors it sends to each host; the
    # browser test before this one may have used the client's share.
    lab.run(lab.router, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit"])
    echo = lab.popen(lab.origin, [sys.executable, "-c", UDP_ECHO])
    try:
        deadline = time.monotonic() + 10
        while not lab.run(lab.origin, ["ss", "-Hlun", "sport", "=", ":443"]).stdout.strip():
            assert echo.poll() is None and time.monotonic() < deadline, "no UDP echo on the origin"
            time.sleep(0.05)
        # The origin answers UDP on 443 (seen from the router itself, which is not a client)...
        router = lab.run(lab.router, [sys.executable, "-c", QUIC_CLIENT, Lab.ORIGIN4, "443"])
        assert router.stdout.decode().strip() == "echo"
        # ...but a client's QUIC is rejected on the way, so browsers fall back to TCP.
        assert tls.python(QUIC_CLIENT, Lab.ORIGIN4, "443").strip() == "refused"
    finally:
        lab.stop_process(echo, grace=1)
