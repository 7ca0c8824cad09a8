"""
HTTP conformance through the real TPROXY path, in raw bytes (issue 10, sections 2 and 3).

A client in the client namespace sends exact bytes to the origin's port 81,
which the router diverts to the proxy's tproxy port; the origin
(``conformance_origin.py``) logs every byte it receives.  Each test asserts what
the client got back AND what reached the origin (or that nothing did).

The session lab diverts only port 80; this module adds its own nftables table
in the router that diverts port 81 as well, and removes it again afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy_twist.lab import TWISTD, Lab
from tproxy_twist.lab.topology import REPO_ROOT, child_env

HERE = Path(__file__).resolve().parent
PORT = 81  # diverted to the tproxy port by this module's rules
TPROXY_PORT = 3129
FORWARD_PORT = 3128
# The proxy's request_header timeout: an answer that only came when it expired
# would arrive after the client's ANSWER_WAIT, and fail the test.
REQUEST_HEADER_TIMEOUT = 120
ANSWER_WAIT = 30

CONFIG = f"""
workers = 1

[metrics]
listen = ""

[timeouts]
request_header = {REQUEST_HEADER_TIMEOUT}

[[port]]
name = "transparent"
listen = "[::]:{TPROXY_PORT}"
mode = "tproxy"

[[port]]
name = "forward"
listen = "[::]:{FORWARD_PORT}"
mode = "forward"
allow = ["198.51.100.0/24", "2001:db8:1::/64"]
"""

RULES = f"""
table inet tpt_conformance {{}}
delete table inet tpt_conformance
table inet tpt_conformance {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        fib daddr type local accept
        meta nfproto ipv4 tcp dport {PORT} tproxy ip to :{TPROXY_PORT} meta mark set 0x1 accept
        meta nfproto ipv6 tcp dport {PORT} tproxy ip6 to :{TPROXY_PORT} meta mark set 0x1 accept
    }}
}}
"""

# Sends stdin to (host, port) and reads one answer: a head plus its
# Content-Length body, or everything until the proxy closes.
CLIENT = """
import json, socket, sys
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
payload = sys.stdin.buffer.read()
s = socket.create_connection((host, port), timeout=wait)
s.sendall(payload)

def complete(data):
    end = data.find(b"\\r\\n\\r\\n")
    if end < 0:
        return False
    for line in data[:end].split(b"\\r\\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(data) >= end + 4 + int(value)
    return False

data = b""
timed_out = False
try:
    while not complete(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except TimeoutError:
    timed_out = True
except ConnectionResetError:
    pass
print(json.dumps({"answer": data.hex(), "timed_out": timed_out}))
"""


class RawOrigin:
    """What the logging origin received, connection by connection."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def received(self, marker: bytes) -> bytes:
        """Every byte of the connection(s) whose bytes contain ``marker``."""
        found = [
            data
            for path in sorted(self.log_dir.glob("*.bin"))
            if marker in (data := path.read_bytes())
        ]
        return b"".join(found)


class Answer:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(b" ")[1]) if lines[0] else 0
        self.fields = [tuple(line.split(b": ", 1)) for line in lines[1:]]

    def get(self, name: bytes) -> bytes | None:
        for field, value in self.fields:
            if field.lower() == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<Answer {self.raw[:300]!r}>"


@pytest.fixture(scope="module")
def origin(lab: Lab) -> Iterator[RawOrigin]:
    log_dir = Path(tempfile.mkdtemp(prefix="conformance-origin-"))
    lab.run(lab.router, ["nft", "-f", "-"], input=RULES.encode())
    proc = lab.popen(
        lab.origin,
        [sys.executable, str(HERE / "conformance_origin.py"), "--port", str(PORT)]
        + ["--log-dir", str(log_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lab.wait_port(lab.origin, Lab.ORIGIN4, PORT)
        lab.wait_port(lab.origin, Lab.ORIGIN6, PORT)
        yield RawOrigin(log_dir)
    finally:
        lab.stop_process(proc, grace=2)
        lab.run(lab.router, ["nft", "delete", "table", "inet", "tpt_conformance"], check=False)
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def conformance_proxy(lab: Lab, origin: RawOrigin) -> Iterator[None]:
    """One ``twistd -n tproxy`` for the module (the ``proxy`` fixture is per test)."""
    run_dir = Path(tempfile.mkdtemp(prefix="conformance-proxy-"))
    config = run_dir / "tproxy.toml"
    config.write_text(CONFIG)
    log_path = run_dir / "twistd.log"
    with open(log_path, "ab") as log:
        popen = lab.popen(
            lab.router,
            [*TWISTD, "-n", "--pidfile", str(run_dir / "twistd.pid"), "tproxy"]
            + ["--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=child_env(),
            start_new_session=True,
        )
    try:
        lab.wait_listening(lab.router, [TPROXY_PORT, FORWARD_PORT], popen, log_path)
        yield
    finally:
        lab.stop_process(popen, grace=10)
        shutil.rmtree(run_dir, ignore_errors=True)


def send(lab: Lab, payload: bytes, host: str = Lab.ORIGIN4, port: int = PORT) -> Answer:
    """Send ``payload`` from the client namespace; the answer, which must come."""
    proc = lab.run(
        lab.client,
        [sys.executable, "-c", CLIENT, host, str(port), str(ANSWER_WAIT)],
        input=payload,
        check=False,
        timeout=ANSWER_WAIT + 30,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = json.loads(proc.stdout)
    answer = Answer(bytes.fromhex(out["answer"]))
    assert not out["timed_out"], f"no complete answer within {ANSWER_WAIT}s: {answer!r}"
    return answer


def marker() -> bytes:
    return b"m" + uuid.uuid4().hex[:16].encode()


pytestmark = pytest.mark.usefixtures("conformance_proxy")


# --- absolute-form targets --------------------------------------------------------


@pytest.mark.parametrize("host", [Lab.ORIGIN4, Lab.ORIGIN6])
def test_absolute_form_target_reaches_the_original_destination_with_its_authority_as_host(
    lab: Lab, origin: RawOrigin, host: str
) -> None:
    m = marker()
    authority = (f"[{host}]" if ":" in host else host).encode() + b":%d" % PORT
    answer = send(
        lab,
        b"GET http://" + authority + b"/abs/" + m + b"?q=1 HTTP/1.1\r\n"
        b"Host: other.example\r\nConnection: close\r\n\r\n",
        host=host,
    )
    assert answer.status == 200, answer
    received = origin.received(m)
    assert received.startswith(b"GET /abs/" + m + b"?q=1 HTTP/1.1\r\nHost: " + authority + b"\r\n")
    assert b"other.example" not in received


@pytest.mark.parametrize(
    "url, reason",
    [
        (b"https://203.0.113.2:81/", b"https://"),
        (b"ftp://203.0.113.2:81/", b"ftp://"),
        (b"http://user:secret@203.0.113.2:81/", b"userinfo"),
        (b"http://@203.0.113.2:81/", b"userinfo"),
        (b"http://203.0.113.2:0/", b"port"),
        (b"http://203.0.113.2:65536/", b"port"),
        (b"http://[2001:db8:2::2/", b"IPv6"),
        (b"http://[2001:db8:2::zz]:81/", b"IPv6"),
        (b"http://:81/", b"empty host"),
    ],
)
def test_invalid_absolute_form_target_is_400_and_reaches_nothing(
    lab: Lab, origin: RawOrigin, url: bytes, reason: bytes
) -> None:
    m = marker()
    answer = send(lab, b"GET " + url + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n\r\n")
    assert answer.status == 400, answer
    assert reason in answer.body, answer
    assert origin.received(m) == b""


@pytest.mark.parametrize(
    "host", [b"203.0.113.2:0", b"203.0.113.2:65536", b":81", b"[2001:db8:2::zz]:81"]
)
def test_host_that_is_not_a_valid_authority_is_400_and_reaches_nothing(
    lab: Lab, origin: RawOrigin, host: bytes
) -> None:
    m = marker()
    answer = send(lab, b"GET /" + m + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert answer.status == 400, answer
    assert b"Host" in answer.body, answer
    assert origin.received(m) == b""


def test_https_url_on_the_forward_port_is_400_saying_to_use_connect(
    lab: Lab, origin: RawOrigin
) -> None:
    m = marker()
    bad = send(
        lab,
        b"GET https://203.0.113.2:81/" + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n\r\n",
        host=Lab.ROUTER_CLIENT4,
        port=FORWARD_PORT,
    )
    assert bad.status == 400, bad
    assert b"CONNECT" in bad.body
    assert origin.received(m) == b""
    good = send(
        lab,
        b"GET http://203.0.113.2:81/" + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n\r\n",
        host=Lab.ROUTER_CLIENT4,
        port=FORWARD_PORT,
    )
    assert good.status == 200, good
    assert origin.received(m).startswith(b"GET /" + m + b" HTTP/1.1\r\n")


# --- start lines that can never begin a valid head --------------------------------


@pytest.mark.parametrize(
    "line, status",
    [
        (b"GET /%s", 400),  # HTTP/0.9: no version, and nothing more will come
        (b"GET /%s HTTP/2.0", 505),
        (b"GET /%s HTTP/1.1 extra", 400),
    ],
)
def test_bad_request_line_is_answered_at_once_not_at_the_header_timeout(
    lab: Lab, origin: RawOrigin, line: bytes, status: int
) -> None:
    m = marker()
    # Only the request line: a proxy that waited for the end of the head would
    # answer at the request_header timeout (120 s), after the client gave up.
    answer = send(lab, line % m + b"\r\n")
    assert answer.status == status, answer
    assert origin.received(m) == b""


# --- request trailers -------------------------------------------------------------


def test_request_trailers_reach_the_origin_without_framing_routing_or_auth_fields(
    lab: Lab, origin: RawOrigin
) -> None:
    m = marker()
    answer = send(
        lab,
        b"POST /trailers/" + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n"
        b"Transfer-Encoding: chunked\r\nTrailer: Content-Digest\r\n\r\n"
        b"5\r\nhello\r\n0\r\n"
        b"Content-Length: 42\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Host: evil.example\r\n"
        b"Authorization: Basic ZXZpbDpldmls\r\n"
        b"Proxy-Authorization: Basic ZXZpbDpldmls\r\n"
        b"Cookie: session=stolen\r\n"
        b"X-Forwarded-For: 192.0.2.66\r\n"
        b"Expect: 100-continue\r\n"
        b"Content-Digest: sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:\r\n"
        b"\r\n",
    )
    assert answer.status == 200, answer
    received = origin.received(m)
    assert received.endswith(
        b"\r\n\r\n5\r\nhello\r\n0\r\n"
        b"Content-Digest: sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:\r\n\r\n"
    ), received
    for dropped in (b"evil", b"stolen", b"192.0.2.66", b"Content-Length", b"100-continue"):
        assert dropped not in received, dropped


# --- limits no stricter than real clients and servers -----------------------------


def test_9000_byte_cookie_reaches_the_origin_whole(lab: Lab, origin: RawOrigin) -> None:
    m = marker()
    cookie = b"a=" + b"c" * 8998
    answer = send(
        lab, b"GET /" + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\nCookie: " + cookie + b"\r\n\r\n"
    )
    assert answer.status == 200, answer
    assert b"\r\nCookie: " + cookie + b"\r\n" in origin.received(m)


def test_16_kib_url_reaches_the_origin_whole(lab: Lab, origin: RawOrigin) -> None:
    m = marker()
    path = b"/" + m + b"/" + b"u" * (16384 - len(m) - 2)
    assert len(path) == 16384
    answer = send(lab, b"GET " + path + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n\r\n")
    assert answer.status == 200, answer
    assert origin.received(m).startswith(b"GET " + path + b" HTTP/1.1\r\n")


def test_9000_byte_set_cookie_reaches_the_client_whole(lab: Lab, origin: RawOrigin) -> None:
    m = marker()
    answer = send(lab, b"GET /" + m + b"?set_cookie=9000 HTTP/1.1\r\nHost: 203.0.113.2:81\r\n\r\n")
    assert answer.status == 200, answer
    assert answer.get(b"set-cookie") == b"s=" + b"c" * 8998
    assert answer.body == b"ok\n"
    assert origin.received(m).startswith(b"GET /" + m + b"?set_cookie=9000 HTTP/1.1\r\n")


def test_60_kib_heads_pass_both_ways(lab: Lab, origin: RawOrigin) -> None:
    m = marker()
    fields = b"".join(b"X-Req-%d: %s\r\n" % (i, b"r" * 1000) for i in range(60))
    answer = send(
        lab,
        b"GET /" + m + b"?fill=60000 HTTP/1.1\r\nHost: 203.0.113.2:81\r\n" + fields + b"\r\n",
    )
    assert answer.status == 200, answer
    assert sum(1 for name, _ in answer.fields if name.startswith(b"X-Fill-")) == 60
    assert fields in origin.received(m)


def test_request_head_over_64_kib_is_431_and_reaches_nothing(lab: Lab, origin: RawOrigin) -> None:
    m = marker()
    fields = b"".join(b"X-Req-%d: %s\r\n" % (i, b"r" * 1000) for i in range(70))
    answer = send(lab, b"GET /" + m + b" HTTP/1.1\r\nHost: 203.0.113.2:81\r\n" + fields + b"\r\n")
    assert answer.status == 431, answer
    assert origin.received(m) == b""
