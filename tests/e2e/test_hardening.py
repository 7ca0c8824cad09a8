"""
Hostile and broken input through the real TPROXY path: each gets its
status, the origin never sees anything it could read differently from us,
and no worker dies.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tproxy_twist.lab import Lab

CONFIG = """
workers = 2

[timeouts]
request_header = 2

[limits]
max_connections_per_client = {per_client}

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
host_verify_strict = {strict}
"""


def config(per_client: int = 0, strict: bool = False) -> str:
    return CONFIG.format(per_client=per_client, strict=str(strict).lower())


def listening_pids(lab: Lab) -> set[int]:
    out = lab.run(lab.router, ["ss", "-Hltnp", "sport", "=", ":3129"]).stdout.decode()
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


# Sends raw bytes to the origin's port 80 (diverted to the proxy), prints the
# status code of the answer, and the origin's connection counter before and
# after (from /ip on fresh connections, also through the proxy).
RAW = """
import json, socket, sys
host = sys.argv[1]
payload = bytes.fromhex(sys.stdin.read())

def connection_id():
    s = socket.create_connection((host, 80), timeout=10)
    s.sendall(b"GET /ip HTTP/1.1\\r\\nHost: o\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return json.loads(data.split(b"\\r\\n\\r\\n", 1)[1])["connection_id"]

before = connection_id()
s = socket.create_connection((host, 80), timeout=10)
s.sendall(payload)
answer = b""
try:
    while chunk := s.recv(65536):
        answer += chunk
except OSError:
    pass
after = connection_id()
print(json.dumps([answer.split(b"\\r\\n", 1)[0].decode("latin-1"), before, after]))
"""

HEAD = b"GET / HTTP/1.1\r\nHost: o\r\n"
BAD_INPUTS = [
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : o\r\n\r\n", 400),
    ("obs-fold", HEAD + b"X-A: 1\r\n  folded\r\n\r\n", 400),
    ("bare-cr", HEAD + b"X-A: 1\r2\r\n\r\n", 400),
    ("nul", HEAD + b"X-A: 1\x002\r\n\r\n", 400),
    ("bare-lf", b"GET / HTTP/1.1\nHost: o\n\n", 400),
    ("garbage-request-line", b"HELLO THERE\r\n\r\n", 400),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: o\r\n\r\n", 505),
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", HEAD + b"Host: p\r\n\r\n", 400),
    (
        "conflicting-cl",
        b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),  # fmt: skip
    ("negative-cl", b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: -1\r\n\r\n", 400),
    (
        "cl-te-smuggling",
        b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 35\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: o\r\n\r\n",
        400,
    ),  # fmt: skip
    # RFC 9112 6.3: chunked not final -> 400; an unknown coding before chunked -> 501.
    ("te-gzip", b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),  # fmt: skip
    (
        "te-chunked-not-last",
        b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),  # fmt: skip
    ("te-in-http-1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # Longer than the default max_request_line (64 KiB: URLs of 16 KiB and more pass).
    ("long-request-line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: o\r\n\r\n", 414),
    ("too-many-fields", HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("huge-header-section", HEAD + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
]


@pytest.fixture
def hardened(proxy, lab):
    running = proxy(config())
    deadline = time.monotonic() + 10
    while len(pids := listening_pids(lab)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    yield running
    assert listening_pids(lab) == pids, "a worker died"


@pytest.mark.parametrize("name, payload, status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_never_reaches_the_origin(
    hardened, lab, name, payload, status
):
    line, before, after = json.loads(_raw(lab, payload))
    assert line.startswith(f"HTTP/1.1 {status} "), line
    # Only the two /ip probes reached the origin: the bad request did not.
    assert after == before + 1


def _raw(lab: Lab, payload: bytes) -> str:
    proc = lab.run(
        lab.client,
        ["python3", "-c", RAW, Lab.ORIGIN4],
        check=False,
        timeout=30,
        input=payload.hex().encode(),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_a_bad_chunk_size_gets_400_and_the_origin_sees_only_a_truncated_body(hardened, lab):
    payload = b"POST /echo HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    line, _, _ = json.loads(_raw(lab, payload))
    assert line.startswith("HTTP/1.1 400 ")


SLOWLORIS = """
import http.client, json, socket, sys, threading, time
host = sys.argv[1]
slow = socket.create_connection((host, 80), timeout=20)
slow.sendall(b"GET / HTTP/1.1\\r\\n")
started = time.monotonic()
cut = []

def trickle():
    try:
        while True:
            time.sleep(0.3)
            slow.sendall(b"X")
    except OSError:
        pass

def wait_for_cut():
    data = b""
    try:
        while chunk := slow.recv(4096):
            data += chunk
    except OSError:
        pass
    cut.append([time.monotonic() - started, data.split(b"\\r\\n", 1)[0].decode()])

threading.Thread(target=trickle, daemon=True).start()
waiter = threading.Thread(target=wait_for_cut)
waiter.start()
statuses = []

def normal():
    c = http.client.HTTPConnection(host, 80, timeout=10)
    c.request("GET", "/ip")
    statuses.append(c.getresponse().status)

threads = [threading.Thread(target=normal) for _ in range(50)]
[t.start() for t in threads]
[t.join() for t in threads]
waiter.join(15)
print(json.dumps([statuses.count(200), cut]))
"""


def test_a_slowloris_client_is_cut_off_while_fifty_others_are_served(hardened, lab):
    proc = lab.run(lab.client, ["python3", "-c", SLOWLORIS, Lab.ORIGIN4], timeout=60)
    served, cut = json.loads(proc.stdout)
    assert served == 50
    [[after, line]] = cut
    assert line.startswith("HTTP/1.1 408 ")
    assert 1.5 < after < 8  # request_header = 2


HOLD = """
import json, socket, sys
host, count = sys.argv[1], int(sys.argv[2])
held = [socket.create_connection((host, 80), timeout=10) for _ in range(count)]
extra = socket.create_connection((host, 80), timeout=10)
extra.settimeout(5)
try:
    refused = extra.recv(4096).split(b"\\r\\n", 1)[0].decode()
except socket.timeout:
    refused = "no answer"
print(json.dumps(refused))
"""


def test_a_client_over_its_connection_limit_is_refused_and_others_are_not(proxy, lab, curl):
    proxy(config(per_client=3).replace("workers = 2", "workers = 1"))
    proc = lab.run(lab.client, ["python3", "-c", HOLD, Lab.ORIGIN4, "3"], timeout=30)
    assert json.loads(proc.stdout).startswith("HTTP/1.1 429 ")
    # Another client address (the client's IPv6 one) is not affected.
    seen = json.loads(curl("-g", f"http://[{Lab.ORIGIN6}]/ip").stdout)
    assert seen["client"] == Lab.CLIENT6


def test_a_forged_host_still_reaches_the_original_destination(proxy, curl):
    proxy(config())
    result = curl("-H", "Host: 192.0.2.1", f"http://{Lab.ORIGIN4}/headers")
    seen = json.loads(result.stdout)
    assert ["Host", "192.0.2.1"] in seen["headers"]  # relayed as sent, to 203.0.113.2


def test_a_forged_host_gets_409_with_host_verify_strict(proxy, curl):
    proxy(config(strict=True))
    result = curl("-i", "-H", "Host: 192.0.2.1", f"http://{Lab.ORIGIN4}/ip")
    assert result.stdout.startswith(b"HTTP/1.1 409 ")
    assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip").stdout)["client"] == Lab.CLIENT4
