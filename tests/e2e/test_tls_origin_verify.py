"""
The first step of a bump against a real nginx TLS origin: from the router,
a spoofed connection (the client's own address) to the origin, the TLS
handshake with the SNI, verified with service_identity against a test CA.
Good, wrong-name, self-signed and expired origin certificates each get
their verdict; only the good one carries a request, and nginx sees the
client's address.  (Bumping the client side is wired in with the TLS
layer; these tests cover what does not depend on it.)
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab
from tproxy_twist.tls.testing import Issued, make_ca, make_server_cert, now_utc

NAME = "origin.test"
PORTS = {"good": 8441, "wrong_name": 8442, "self_signed": 8443, "expired": 8444}

NGINX = """\
daemon off;
master_process off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format saw '$server_port $remote_addr $ssl_server_name';
    access_log {tmp}/access.log saw;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{servers}
}}
"""
SERVER = """\
    server {{
        listen {port} ssl;
        listen [::]:{port} ssl;
        ssl_certificate {tmp}/{kind}.pem;
        ssl_certificate_key {tmp}/{kind}.key;
        location / {{ return 200 "hello from {kind}\\n"; }}
    }}
"""

# Runs in the router namespace: one verdict per (family, port).
VERIFY = """\
import json, sys
from twisted.internet import protocol, reactor, defer
from tproxy_twist.sockets import connect_upstream
from tproxy_twist.tls.verify import OriginTLS, OriginTrust, load_trust_root

trust = OriginTrust(load_trust_root(sys.argv[1]))
jobs = json.loads(sys.argv[2])
connect = connect_upstream(reactor)
results = {}

class Fetch(protocol.Protocol):
    def __init__(self, done):
        self.data, self.done = b"", done
    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.1\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n"
                             % sys.argv[3].encode())
    def dataReceived(self, data):
        self.data += data
    def connectionLost(self, reason):
        self.done.callback(self.data.decode(errors="replace"))

@defer.inlineCallbacks
def one(key, source, host, port, name):
    origin = OriginTLS(trust.creator(name), reactor, 10)
    factory = protocol.ClientFactory.forProtocol(lambda: origin)
    def failed(connector, reason):
        if not origin.verdict.called:
            origin.verdict.callback(None)
    factory.clientConnectionFailed = failed
    connect(host, port, factory, 10, source)
    verdict = yield origin.verdict
    if verdict is None:
        results[key] = {"result": "connect_failed"}
        return
    result = {"result": verdict.result, "detail": verdict.detail}
    if verdict.ok:
        done = defer.Deferred()
        origin.attach(Fetch(done))
        result["response"] = yield done
    results[key] = result

@defer.inlineCallbacks
def main():
    try:
        yield defer.gatherResults([one(*job) for job in jobs])
    finally:
        print(json.dumps(results))
        reactor.stop()

reactor.callWhenRunning(main)
reactor.run()
"""


@pytest.fixture(scope="module")
def certificates() -> dict[str, Issued]:
    ca = make_ca("e2e origin CA")
    now = now_utc()
    return {
        "ca": ca,
        "good": make_server_cert([NAME, Lab.ORIGIN4, Lab.ORIGIN6], ca),
        "wrong_name": make_server_cert(["elsewhere.test"], ca),
        "self_signed": make_server_cert([NAME], None),
        "expired": make_server_cert(
            [NAME],
            ca,
            not_before=now - datetime.timedelta(days=90),
            not_after=now - datetime.timedelta(days=2),
        ),
    }


@pytest.fixture
def tls_origin(lab: Lab, tmp_path: Path, certificates) -> Iterator[Path]:
    """nginx in the origin namespace, one TLS port per kind of certificate."""
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    for kind, issued in certificates.items():
        (tmp / f"{kind}.pem").write_bytes(issued.cert_pem)
        (tmp / f"{kind}.key").write_bytes(issued.key_pem)
    servers = "".join(SERVER.format(port=p, kind=k, tmp=tmp) for k, p in PORTS.items())
    (tmp / "nginx.conf").write_text(NGINX.format(tmp=tmp, servers=servers))
    with open(tmp / "nginx.out", "wb") as out:
        proc = lab.popen(
            lab.origin,
            ["nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        lab.wait_listening(lab.origin, list(PORTS.values()), proc, tmp / "error.log")
        yield tmp
    finally:
        lab.stop_process(proc)


def verdicts(lab: Lab, tmp_path: Path, certificates, jobs: list) -> dict:
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(certificates["ca"].cert_pem)
    script = tmp_path / "verify.py"
    script.write_text(VERIFY)
    result = lab.run(
        lab.router,
        [sys.executable, str(script), str(bundle), json.dumps(jobs), NAME],
        timeout=60,
    )
    return json.loads(result.stdout)


def test_origins_are_verified_over_the_spoofed_path_and_only_good_ones_pass(
    lab: Lab, tmp_path: Path, certificates, tls_origin: Path
):
    jobs = [[kind, lab.CLIENT4, lab.ORIGIN4, port, NAME] for kind, port in PORTS.items()] + [
        ["good_v6", lab.CLIENT6, lab.ORIGIN6, PORTS["good"], NAME]
    ]
    results = verdicts(lab, tmp_path, certificates, jobs)
    assert {k: v["result"] for k, v in results.items()} == {
        "good": "ok",
        "good_v6": "ok",
        "wrong_name": "bad_name",
        "self_signed": "unknown_issuer",
        "expired": "expired",
    }, results
    assert results["good"]["response"].startswith("HTTP/1.1 200")
    assert "hello from good" in results["good"]["response"]
    # nginx saw the client's own addresses and the SNI, on the good port only with a request.
    seen = (tls_origin / "access.log").read_text().split("\n")
    assert f"{PORTS['good']} {lab.CLIENT4} {NAME}" in seen
    assert f"{PORTS['good']} {lab.CLIENT6} {NAME}" in seen
    assert not [line for line in seen if line and not line.startswith(str(PORTS["good"]))]


def test_without_sni_the_origin_is_verified_against_the_original_destination(
    lab: Lab, tmp_path: Path, certificates, tls_origin: Path
):
    jobs = [
        ["by_ip", lab.CLIENT4, lab.ORIGIN4, PORTS["good"], lab.ORIGIN4],
        ["by_ip_no_san", lab.CLIENT4, lab.ORIGIN4, PORTS["expired"], lab.ORIGIN4],
    ]
    results = verdicts(lab, tmp_path, certificates, jobs)
    assert results["by_ip"]["result"] == "ok", results
    # Expired and not naming the address: the chain problem is reported first.
    assert results["by_ip_no_san"]["result"] == "expired", results
