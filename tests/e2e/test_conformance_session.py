"""
The session's HTTP semantics as raw bytes through the real TPROXY path:
each test asserts what the client gets AND what reached the origin (a
scripted origin that logs every byte it receives, see
L{tproxy_twist.lab.origin.raw_main}).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab
from tproxy_twist.rules import DivertPort, render_nftables

# The session lab's rules (tests/e2e/conftest.py) divert port 80 to the proxy's
# 3129; this module adds the scripted origin's port while it runs.
TPROXY_PORT = 3129
DIVERTED_PORT = 80
RAW_PORT = 8181
ORIGIN = f"{Lab.ORIGIN4}:{RAW_PORT}"

CONFIG = """
workers = 1
drain_timeout = {drain}

[timeouts]
response = {response}

[access_log]
path = "{log}"

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"

[[port]]
name = "forward"
listen = "198.51.100.1:3128"
mode = "forward"
allow = ["198.51.100.0/24"]
"""

# Runs in the client namespace: connects, performs the steps (send HEX, shut
# the sending side, read until HEX appears), then reads until the connection
# ends; prints what it received and how the connection ended.
CLIENT = r"""
import json, socket, sys
spec = json.loads(sys.stdin.read())
s = socket.create_connection((spec["host"], spec["port"]), timeout=spec["timeout"])
data = b""
end = "open"

def read_until(marker):
    global data, end
    while marker not in data:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            end = "timeout"
            return
        except ConnectionResetError:
            end = "reset"
            return
        if not chunk:
            end = "eof"
            return
        data += chunk

for step in spec["steps"]:
    if "send" in step:
        s.sendall(bytes.fromhex(step["send"]))
    elif "shut" in step:
        s.shutdown(socket.SHUT_WR)
    elif "until" in step:
        read_until(bytes.fromhex(step["until"]))
if end == "open":
    read_until(b"\0never\0")
print(json.dumps({"data": data.hex(), "end": end}))
"""


class RawOrigin:
    """The test side of the scripted origin: one case per test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._cases = 0

    def case(self, script: dict[str, list[dict]]) -> Path:
        """Make a new case the origin answers by C{script}; returns its directory."""
        self._cases += 1
        case = self.base / f"case-{self._cases}"
        case.mkdir()
        (case / "script.json").write_text(json.dumps(script))
        (self.base / "current").write_text(case.name)
        return case


def connections(case: Path) -> list[bytes]:
    """What reached the origin, per connection, in order."""
    files = sorted(case.glob("conn-*.bin"), key=lambda p: int(p.stem.split("-")[1]))
    return [f.read_bytes() for f in files]


def send(data: bytes, close: bool = False) -> dict:
    return {"send": data.hex(), **({"close": True} if close else {})}


@pytest.fixture(scope="module")
def raw_origin(lab: Lab, tmp_path_factory) -> RawOrigin:
    base = tmp_path_factory.mktemp("raw-origin")
    log = open(base / "origin.log", "ab")
    code = "from tproxy_twist.lab.origin import raw_main; raw_main()"
    argv = [sys.executable, "-c", code, "--dir", str(base), "--port", str(RAW_PORT)]
    proc = lab.popen(lab.origin, argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        lab.wait_port(lab.origin, Lab.ORIGIN4, RAW_PORT)
        lab.apply_rules(render_nftables([DivertPort(TPROXY_PORT, (DIVERTED_PORT, RAW_PORT))]))
        yield RawOrigin(base)
    finally:
        lab.apply_rules(render_nftables([DivertPort(TPROXY_PORT, (DIVERTED_PORT,))]))
        lab.stop_process(proc, grace=1)
        log.close()


@pytest.fixture
def relay(proxy, tmp_path):
    """Start the proxy; returns its access-log path."""
    access_log = tmp_path / "access.log"

    def start(response: float = 60, drain: float = 30):
        running = proxy(CONFIG.format(log=access_log, response=response, drain=drain))
        return running, access_log

    return start


def client(
    lab: Lab, steps: list[dict], *, host: str = Lab.ORIGIN4, port: int = RAW_PORT, timeout=10
) -> tuple[bytes, str]:
    spec = {"host": host, "port": port, "steps": steps, "timeout": timeout}
    proc = lab.run(
        lab.client,
        ["python3", "-c", CLIENT],
        check=False,
        timeout=timeout * 3 + 30,
        input=json.dumps(spec).encode(),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    return bytes.fromhex(out["data"]), out["end"]


def wait_for(predicate, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout}s")


def access_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def head(data: bytes) -> tuple[bytes, list[bytes]]:
    start, *fields = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return start, fields


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# --- response framing fits the client's version -------------------------------------------


def test_an_http10_client_gets_a_chunked_response_dechunked_and_delimited_by_close(
    relay, raw_origin, lab
):
    relay()
    case = raw_origin.case(
        {
            "0": [
                send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n"
                )
            ]
        }
    )
    data, end = client(lab, [send(b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")])
    start, fields = head(data)
    assert start == b"HTTP/1.1 200 OK"
    assert not any(f.lower().startswith(b"transfer-encoding") for f in fields)
    assert b"Connection: close" in fields
    assert data.endswith(b"\r\n\r\nwikipedia") and end == "eof"
    # HTTP/1.0 without Host: upstream it is HTTP/1.1 with the original destination as Host.
    [seen] = connections(case)
    assert seen.startswith(b"GET /c HTTP/1.1\r\nHost: " + ORIGIN.encode() + b"\r\n")


def test_an_http10_client_keeps_its_connection_when_the_length_is_known(relay, raw_origin, lab):
    relay()
    case = raw_origin.case({"0": [send(OK), send(OK.replace(b"hello", b"again"))]})
    request = b"GET /k HTTP/1.0\r\nHost: o\r\nConnection: keep-alive\r\n\r\n"
    data, end = client(
        lab, [send(request), {"until": b"hello".hex()}, send(request), {"until": b"again".hex()}]
    )
    assert data.count(b"Connection: keep-alive") == 2
    assert end == "timeout"  # still open after two answers: the client stopped waiting
    [seen] = connections(case)
    assert seen.count(b"GET /k HTTP/1.1\r\n") == 2


# --- refused before any upstream connection -------------------------------------------------


def test_an_invalid_authority_or_first_chunk_size_is_400_and_never_reaches_the_origin(
    relay, raw_origin, lab
):
    relay()
    case = raw_origin.case({"*": [send(OK)]})
    bad_port, _ = client(lab, [send(b"GET / HTTP/1.1\r\nHost: " + ORIGIN.encode() + b"9\r\n\r\n")])
    assert bad_port.startswith(b"HTTP/1.1 400 ")
    bad_chunk, _ = client(
        lab,
        [send(b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n")],
    )
    assert bad_chunk.startswith(b"HTTP/1.1 400 ")
    assert connections(case) == []


# --- Upgrade ---------------------------------------------------------------------------


def test_a_101_nobody_asked_for_is_502_and_none_of_it_reaches_the_client(relay, raw_origin, lab):
    relay()
    case = raw_origin.case(
        {
            "0": [
                send(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                    b"Connection: upgrade\r\n\r\nxx"
                )
            ]
        }
    )
    data, _ = client(lab, [send(b"GET /u HTTP/1.1\r\nHost: o\r\n\r\n")])
    assert data.startswith(b"HTTP/1.1 502 ")
    assert b"101" not in data.split(b"\r\n", 1)[0] and b"Upgrade" not in data
    assert not data.endswith(b"xx")
    [seen] = connections(case)
    assert seen.startswith(b"GET /u HTTP/1.1\r\n")


def test_upgrade_in_an_http10_request_is_removed(relay, raw_origin, lab):
    relay()
    case = raw_origin.case({"0": [send(OK)]})
    data, _ = client(
        lab,
        [send(b"GET /ws HTTP/1.0\r\nHost: o\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")],
    )
    assert data.endswith(b"hello")
    [seen] = connections(case)
    assert b"upgrade" not in seen.lower()


# --- an upstream that says more than it was asked --------------------------------------------


def test_bytes_after_a_complete_response_are_never_read_as_the_next_response(
    relay, raw_origin, lab
):
    relay()
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    case = raw_origin.case(
        {
            "0": [send(OK + smuggled)],
            "1": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")],
        }
    )
    request = b"GET /s HTTP/1.1\r\nHost: o\r\n\r\n"
    data, _ = client(
        lab, [send(request), {"until": b"hello".hex()}, send(request), {"until": b"good".hex()}]
    )
    assert b"evil" not in data and data.endswith(b"good")
    first, second = connections(case)  # the second request went to a fresh connection
    assert first.count(b"GET /s") == 1 and second.count(b"GET /s") == 1


def test_a_request_replayed_on_a_forward_port_still_times_out(relay, raw_origin, lab):
    """The origin closes a reused connection as the next GET arrives; the GET is
    resent on a new connection, where the origin never answers: 504."""
    relay(response=2)
    case = raw_origin.case({"0": [send(OK), {"close": True}], "1": [{"hold": True}]})
    request = f"GET http://{ORIGIN}/r HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n".encode()
    data, end = client(
        lab,
        [send(request), {"until": b"hello".hex()}, send(request), {"until": b"HTTP/1.1 504".hex()}],
        host=Lab.ROUTER_CLIENT4,
        port=3128,
        timeout=20,
    )
    assert b"HTTP/1.1 504 " in data, (data, end)
    first, second = connections(case)
    assert first.count(b"GET /r HTTP/1.1") == 2 and second.count(b"GET /r HTTP/1.1") == 1


# --- half-closed clients -------------------------------------------------------------------


def test_requests_sent_before_a_half_close_are_all_answered_then_the_connection_closes(
    relay, raw_origin, lab
):
    relay()
    case = raw_origin.case({"0": [send(OK), send(OK.replace(b"hello", b"later"))]})
    request = b"GET /h HTTP/1.1\r\nHost: o\r\n\r\n"
    data, end = client(lab, [send(request + request), {"shut": True}])
    assert data.count(b"HTTP/1.1 200 OK") == 2 and data.endswith(b"later")
    assert end == "eof"
    [seen] = connections(case)
    assert seen.count(b"GET /h") == 2


# --- incomplete responses --------------------------------------------------------------------


def test_a_response_cut_off_by_the_origin_is_logged_aborted(relay, raw_origin, lab):
    _, access_log = relay()
    raw_origin.case(
        {"0": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", close=True)]}
    )
    data, end = client(lab, [send(b"GET /cut HTTP/1.1\r\nHost: o\r\n\r\n")])
    assert data.endswith(b"0123456789") and end in ("reset", "eof")
    line = wait_for(
        lambda: [x for x in access_lines(access_log) if "/cut" in x], "the access-log line"
    )
    assert "TCP_MISS_ABORTED/200" in line[0]


def test_a_connection_ended_by_the_drain_timeout_gets_its_access_log_line(relay, raw_origin, lab):
    running, access_log = relay(drain=1)
    case = raw_origin.case(
        {"0": [send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")]}
    )
    spec = {
        "host": Lab.ORIGIN4,
        "port": RAW_PORT,
        "steps": [send(b"GET /drain HTTP/1.1\r\nHost: o\r\n\r\n")],
        "timeout": 20,
    }
    slow = lab.popen(
        lab.client,
        ["python3", "-c", CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    slow.stdin.write(json.dumps(spec).encode())
    slow.stdin.close()
    wait_for(lambda: b"/drain" in b"".join(connections(case)), "the request reaching the origin")
    running.send_signal(signal.SIGTERM)
    line = wait_for(
        lambda: [x for x in access_lines(access_log) if "/drain" in x], "the access-log line"
    )
    assert "TCP_MISS_ABORTED/200" in line[0]
    slow.wait(timeout=30)
    out = json.loads(slow.stdout.read())
    assert bytes.fromhex(out["data"]).endswith(b"0123456789") and out["end"] in ("eof", "reset")


# --- out of descriptors ----------------------------------------------------------------------


def _worker_pids(lab: Lab) -> list[int]:
    out = lab.run(lab.router, ["ss", "-Hltnp", "sport", "=", ":3129"]).stdout.decode()
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def _settled_fds(pid: int) -> set[int]:
    """
    The worker's open descriptors once two listings 0.2 s apart agree: a worker
    that has just started listening may still open or close one (a descriptor
    counted as used that closes a moment later leaves one more free below the
    limit these tests set, and the case under test does not happen).
    """
    listing = None

    def settled():
        nonlocal listing
        now = {int(p.name) for p in Path(f"/proc/{pid}/fd").iterdir()}
        same, listing = now == listing, now
        if not same:
            time.sleep(0.2)
        return same

    wait_for(settled, "the worker's descriptors settling", timeout=30)
    return listing


def test_an_upstream_socket_failing_with_emfile_is_503_no_descriptors(relay, raw_origin, lab):
    running, _ = relay()
    case = raw_origin.case({"*": [send(OK)]})
    [worker] = _worker_pids(lab)
    # Room for the accepted client connection, none for the upstream socket.
    # (The limit bounds descriptor numbers: the lowest free one stays usable.)
    used = _settled_fds(worker)
    free = [n for n in range(max(used) + 3) if n not in used]
    limit = free[1]
    subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={limit}:{limit}"], check=True)
    data, _ = client(lab, [send(b"GET /fd HTTP/1.1\r\nHost: o\r\n\r\n")])
    assert data.startswith(b"HTTP/1.1 503 "), (data, running.log_text()[-3000:])
    assert b"file descriptors" in data and b"spoofing" not in data
    assert connections(case) == []
    assert "CAP_NET_ADMIN" not in running.log_text()


# Runs in the client namespace: opens N connections at once, sends a request on
# each, then reads each answer; prints how many were 200 OK.
MANY = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port), timeout=60) for _ in range(n)]
for i, s in enumerate(socks):
    s.sendall(b"GET /many/%d HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n" % i)
ok = 0
for s in socks:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    ok += data.startswith(b"HTTP/1.1 200 ")
print(ok)
"""


def _nofile(pid: int) -> tuple[str, str]:
    """The process's soft and hard RLIMIT_NOFILE, as prlimit takes them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files limit for {pid}")


def test_out_of_descriptors_at_accept_connections_wait_and_are_served_with_one_log_line(
    relay, raw_origin, lab
):
    running, _ = relay()
    case = raw_origin.case({"*": [send(OK)]})
    [worker] = _worker_pids(lab)
    # No descriptor left for an accepted connection.  Twisted's own accept loop
    # logged every attempt and tried again every reactor turn (a busy loop and a
    # log flood); the worker pauses accepting instead, and the connections wait.
    used = _settled_fds(worker)
    lowest_free = min(n for n in range(max(used) + 2) if n not in used)
    soft, hard = _nofile(worker)
    subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={lowest_free}:{hard}"], check=True)
    waiting = 40
    clients = lab.popen(
        lab.client,
        ["python3", "-c", MANY, Lab.ORIGIN4, str(RAW_PORT), str(waiting)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: "cannot accept connections" in running.log_text(), "the EMFILE line")
        # Time for many retries (each pause is half a second).
        time.sleep(3)
        assert connections(case) == []  # nothing served while out of descriptors
        subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={soft}:{hard}"], check=True)
        out, err = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait()
    assert out.decode().strip() == str(waiting), err.decode()
    # Every request reached the origin (on fewer connections: the proxy reuses them).
    assert sum(c.count(b"GET /many/") for c in connections(case)) == waiting
    log = running.log_text()
    lines = [line for line in log.splitlines() if "cannot accept connections" in line]
    assert len(lines) == 1, lines  # one line per 10 s, not one per attempt
    assert "Too many open files" in lines[0] and "RLIMIT_NOFILE" in lines[0]
    assert "Could not accept" not in log and running.alive()


def test_out_of_descriptors_for_a_pipe_a_large_body_is_copied_whole(relay, raw_origin, lab):
    running, access_log = relay()
    body = bytes(range(256)) * 4096  # 1 MiB: spliced (limits.splice_body_min is 512 KiB)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    case = raw_origin.case({"*": [send(head + body)]})
    [worker] = _worker_pids(lab)
    # Room for the client's and the upstream socket, none for a pipe (two more).
    used = _settled_fds(worker)
    free = [n for n in range(max(used) + 4) if n not in used]
    soft, hard = _nofile(worker)
    subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={free[1] + 1}:{hard}"], check=True)
    try:
        data, _ = client(lab, [send(b"GET /big HTTP/1.1\r\nHost: o\r\n\r\n")])
    finally:
        subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={soft}:{hard}"], check=True)
    response_head, _, got = data.partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 200 "), running.log_text()[-3000:]
    assert got == body, (len(got), running.log_text()[-3000:])
    assert len(connections(case)) == 1
    log = running.log_text()
    assert log.count("cannot make a pipe for splice(2)") == 1, log[-3000:]
