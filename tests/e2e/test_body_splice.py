"""
Response bodies with a Content-Length relayed with splice(2) (issue 14): the
rest of a body past C{[limits] splice_body_min} goes socket to socket, then
the connection is Twisted's again.  Through the transparent path, in network
namespaces: byte-exact, counted, kept alive, and every way a body can break
off (client, origin, reload) ends cleanly.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab
from tproxy_twist.lab.origin import expected_sha256

CONFIG = """
workers = 1

[metrics]
listen = "127.0.0.1:9464"

[timeouts]
idle = 30

[access_log]
path = "{log}"
format = "json"

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
"""

ORIGIN = f"http://{Lab.ORIGIN4}"
MB = 1024 * 1024


@pytest.fixture
def running(proxy, tmp_path):
    access_log = tmp_path / "access.log"
    process = proxy(CONFIG.format(log=access_log))
    process.access_log = access_log
    return process


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


def metrics(lab: Lab) -> str:
    return lab.run(lab.router, ["curl", "-s", "http://127.0.0.1:9464/metrics"]).stdout.decode()


def metric(lab: Lab, name: str, **labels: str) -> float:
    """The sum of the series of C{name} whose labels include C{labels}."""
    total = 0.0
    for found_labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", metrics(lab), re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found_labels))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def spliced(lab: Lab) -> float:
    return metric(lab, "tproxy_streams_total", port="transparent", how="splice")


def access_entries(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def test_a_100mb_download_is_spliced_and_arrives_byte_exact_and_counted(
    running, curl, lab, tmp_path
):
    n = 100 * MB
    out = tmp_path / "download"
    result = curl("-o", str(out), "--max-time", "120", f"{ORIGIN}/bytes?n={n}&seed=big",
                  timeout=150)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(n, "big")
    # Relayed with splice(2), and still counted: the metrics and the access log
    # see every byte although the worker never read them.
    wait_for(lambda: spliced(lab) == 1.0, "one spliced stream in the metrics")
    wait_for(
        lambda: metric(lab, "tproxy_bytes_total", port="transparent", direction="out") > n,
        "the body's bytes in tproxy_bytes_total",
    )
    [entry] = wait_for(lambda: access_entries(running.access_log), "the access-log line")
    assert entry["status"] == 200 and entry["bytes_out"] > n
    assert entry["result"] == "TCP_MISS"


KEEP_ALIVE = r"""
import hashlib, json, socket, sys
from tproxy_twist.lab.origin import expected_sha256
n = int(sys.argv[1])
s = socket.create_connection((sys.argv[2], 80), timeout=20)
def response():
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = bytearray()
    while len(body) < length:
        # Never past this body: the next response may already be behind it.
        chunk = s.recv(min(1 << 20, length - len(body)))
        assert chunk, "EOF mid-body"
        body += chunk
    conn = head.lower().split(b"x-connection-id: ")[1].split(b"\r\n")[0].decode()
    return head, bytes(body), conn
# Two requests pipelined: the second waits while the first's body is spliced.
s.sendall(b"GET /bytes?n=%d&seed=ka HTTP/1.1\r\nHost: o\r\n\r\n" % n
          + b"GET /ip HTTP/1.1\r\nHost: o\r\n\r\n")
_, big, conn1 = response()
_, ip, conn2 = response()
# And a third after both, on the same connection, spliced again.
s.sendall(b"GET /bytes?n=%d&seed=ka HTTP/1.1\r\nHost: o\r\n\r\n" % n)
_, again, conn3 = response()
print(json.dumps({
    "exact": hashlib.sha256(big).hexdigest() == expected_sha256(n, "ka") and again == big,
    "ip": json.loads(ip), "same_origin_connection": conn1 == conn2 == conn3,
}))
"""


def test_keep_alive_goes_on_after_a_spliced_body_and_a_pipelined_request_waits_for_it(
    running, client_python, lab
):
    n = 8 * MB
    out = json.loads(client_python(KEEP_ALIVE.replace("sys.argv[1]", str(n)).replace(
        "sys.argv[2]", repr(Lab.ORIGIN4))))  # fmt: skip
    assert out["exact"]
    assert out["ip"]["client"] == Lab.CLIENT4
    assert out["ip"]["requests_on_connection"] == 2
    # The pinned upstream connection was reused: the origin saw one connection.
    assert out["same_origin_connection"]
    wait_for(lambda: spliced(lab) == 2.0, "two spliced bodies")
    # Request counts reach /metrics a few times a second.
    wait_for(
        lambda: metric(lab, "tproxy_requests_total", port="transparent", code="200") == 3,
        "three requests counted",
    )


ABORT = r"""
import socket, struct, sys
s = socket.create_connection(({origin!r}, 80), timeout=20)
s.sendall(b"GET /bytes?n={n}&seed=ab HTTP/1.1\r\nHost: o\r\n\r\n")
got = 0
while got < 4 << 20:
    got += len(s.recv(1 << 20))
{close}
print(got)
"""


@pytest.mark.parametrize(
    "close",
    ["s.close()",
     "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); s.close()"],
    ids=["close", "reset"],
)  # fmt: skip
def test_a_client_leaving_mid_body_ends_both_connections_and_is_logged_once(
    running, client_python, lab, close
):
    client_python(ABORT.format(origin=Lab.ORIGIN4, n=500 * MB, close=close))
    wait_for(lambda: spliced(lab) == 1.0, "the body was spliced")
    [entry] = wait_for(lambda: access_entries(running.access_log), "the access-log line")
    assert entry["result"] == "TCP_MISS_ABORTED" and entry["status"] == 200
    assert 4 * MB <= entry["bytes_out"] < 500 * MB
    # Both connections are closed: nothing left open in the worker, and the
    # origin's side is gone too (no connection to port 80 left in the router).
    wait_for(
        lambda: metric(lab, "tproxy_connections_active", port="transparent") == 0,
        "no active connection",
    )
    wait_for(
        lambda: (
            ":80 "
            not in lab.run(lab.router, ["ss", "-Htn", "state", "established"]).stdout.decode()
        ),
        "the upstream connection closed",
    )
    time.sleep(0.5)  # a second record would be written right away, if at all
    assert len(access_entries(running.access_log)) == 1
    assert metric(lab, "tproxy_upstream_errors_total", port="transparent") == 0


def test_an_origin_sending_less_than_its_content_length_gets_the_client_closed(
    running, curl, lab, tmp_path
):
    n = 20 * MB
    out = tmp_path / "short"
    result = curl("-o", str(out), "--max-time", "60", f"{ORIGIN}/bytes?n={n}&short=1000000",
                  timeout=90)  # fmt: skip
    # The client must not take the truncated body for a whole one: its
    # connection is reset (curl 56), as when the body is copied, or at least
    # closed short (18, "outstanding read data remaining").
    assert result.returncode in (18, 56), (result.returncode, result.stderr.decode())
    assert out.stat().st_size <= n - 1_000_000
    wait_for(lambda: spliced(lab) == 1.0, "the body was spliced")
    wait_for(
        lambda: (
            metric(lab, "tproxy_upstream_errors_total", port="transparent", reason="reset") == 1
        ),
        "an upstream error counted",
    )
    [entry] = wait_for(lambda: access_entries(running.access_log), "the access-log line")
    assert entry["result"] == "TCP_MISS_ABORTED"
    wait_for(
        lambda: metric(lab, "tproxy_connections_active", port="transparent") == 0,
        "no active connection",
    )


def test_a_slow_client_gets_the_whole_spliced_body(running, curl, lab, tmp_path):
    n = 12 * MB
    out = tmp_path / "slow"
    result = curl("-o", str(out), "--limit-rate", "3M", "--max-time", "60",
                  f"{ORIGIN}/bytes?n={n}&seed=slow", timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(n, "slow")
    wait_for(lambda: spliced(lab) == 1.0, "the body was spliced")


STARTED = r"""
import hashlib, socket, sys
from tproxy_twist.lab.origin import expected_sha256
n = {n}
s = socket.create_connection(({origin!r}, 80), timeout=30)
s.sendall(b"GET /bytes?n=%d&seed=hup&rate=4000000 HTTP/1.1\r\nHost: o\r\n\r\n" % n)
data = b""
while b"\r\n\r\n" not in data:
    data += s.recv(65536)
head, body = data.split(b"\r\n\r\n", 1)
body = bytearray(body)
while len(body) < 1 << 20:
    body += s.recv(1 << 20)
print("started", flush=True)
while len(body) < n:
    chunk = s.recv(1 << 20)
    assert chunk, "EOF after %d bytes" % len(body)
    body += chunk
print(hashlib.sha256(body).hexdigest() == expected_sha256(n, "hup"), flush=True)
"""


def test_a_reload_during_a_spliced_body_lets_it_finish(running, lab):
    n = 16 * MB
    download = lab.popen(
        lab.client,
        [sys.executable, "-c", STARTED.format(n=n, origin=Lab.ORIGIN4)],
        stdout=subprocess.PIPE,
    )
    try:
        assert download.stdout.readline().strip() == b"started"
        running.send_signal(signal.SIGHUP)
        running.wait_log("generation 2 ready", timeout=60)
        assert download.wait(timeout=60) == 0
        assert download.stdout.readline().strip() == b"True"
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    [entry] = wait_for(lambda: access_entries(running.access_log), "the access-log line")
    assert entry["result"] == "TCP_MISS" and entry["bytes_out"] > n
