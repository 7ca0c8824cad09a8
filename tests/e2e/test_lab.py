"""The lab, the TPROXY rules and the origin server, proven on the real kernel without the proxy.

The session ``lab`` has the nftables rules for ``DivertPort(3129, (80,))``
applied in the router, and the origin listening on 80 (diverted) and 8080 (not).
"""

from __future__ import annotations

import hashlib
import json
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tproxy_twist.lab import Lab, cleanup_stale
from tproxy_twist.lab.origin import expected_sha256
from tproxy_twist.lab.topology import OWNERS_DIR
from tproxy_twist.rules import DivertPort, render_iptables, render_nftables

FAMILIES = pytest.mark.parametrize(
    "client_ip, origin_ip",
    [(Lab.CLIENT4, Lab.ORIGIN4), (Lab.CLIENT6, Lab.ORIGIN6)],
    ids=["ipv4", "ipv6"],
)


def url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


def router_listeners(lab: Lab, port: int) -> list[str]:
    out = lab.run(lab.router, ["ss", "-Hltn", "sport", "=", f":{port}"]).stdout.decode()
    return [line for line in out.splitlines() if line.strip()]


# A minimal TPROXY listener: IPV6_TRANSPARENT on [::]:PORT (one socket for both
# families). For each connection it answers with JSON naming the connection's
# local address (the original destination) and peer; in "relay" mode it first
# fetches /ip from that original destination over a connection bound to the
# client's address (IP_TRANSPARENT), as the proxy does.
TPROXY_LISTENER = r"""
import json, socket, sys
IP_TRANSPARENT, IPV6_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT = 19, 75, 24
mode, port = sys.argv[1], int(sys.argv[2])

def plain(addr):
    host = addr[0][7:] if addr[0].startswith("::ffff:") and "." in addr[0] else addr[0]
    return [host, addr[1]]

def relay(client_ip, destination):
    family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as up:
        if family == socket.AF_INET:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            up.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        else:
            up.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        up.bind((client_ip, 0))
        up.settimeout(10)
        up.connect(destination)
        local = plain(up.getsockname())
        up.sendall(b"GET /ip HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
        response = b""
        while data := up.recv(65536):
            response += data
    return local, json.loads(response.split(b"\r\n\r\n", 1)[1])

srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
srv.bind(("::", port))
srv.listen(16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(10)
        head = b""
        try:
            while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                head += data
        except OSError:
            continue
        report = {"sockname": plain(conn.getsockname()), "peername": plain(conn.getpeername())}
        if mode == "relay":
            try:
                report["upstream_local"], report["upstream"] = relay(
                    report["peername"][0], tuple(report["sockname"]))
            except Exception as e:
                report["error"] = repr(e)
        body = json.dumps(report).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
"""


@pytest.fixture
def tproxy_listener(lab: Lab) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start TPROXY_LISTENER on the lab's tproxy port (3129) in the router; stop it after."""
    procs: list[subprocess.Popen] = []

    def start(mode: str) -> subprocess.Popen:
        assert not router_listeners(lab, 3129), "something already listens on 3129"
        proc = lab.popen(
            lab.router,
            [sys.executable, "-c", TPROXY_LISTENER, mode, "3129"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            lab.stop_process(proc)
            pytest.fail(f"TPROXY listener did not start: {proc.stderr.read().decode()}")
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            lab.stop_process(proc)


# -- routing through the lab, no interception ----------------------------------


@FAMILIES
def test_client_reaches_origin_directly_on_undiverted_port(
    lab: Lab, curl, client_ip: str, origin_ip: str
) -> None:
    """Port 8080 is not diverted: the router forwards, the origin sees the client itself."""
    result = curl(url(origin_ip, 8080, "/ip"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["client"] == client_ip


# -- what the rules do when nothing listens -------------------------------------


@FAMILIES
def test_nftables_tproxy_without_listener_fails_open(
    lab: Lab, curl, client_ip: str, origin_ip: str
) -> None:
    """With nothing on the tproxy port, nftables routes diverted traffic on, unproxied.

    The kernel's nft ``tproxy`` expression finds no socket and ends the rule
    (NFT_BREAK): the ``meta mark set ... accept`` after it never runs, the
    packet stays unmarked and the router forwards it like any other. So when
    the proxy is down, port-80 traffic reaches the origin directly, with the
    client's own address (fail-open).
    """
    assert not router_listeners(lab, 3129)
    result = curl(url(origin_ip, 80, "/ip"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["client"] == client_ip


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed")
@FAMILIES
def test_iptables_tproxy_without_listener_drops(client_ip: str, origin_ip: str) -> None:
    """With nothing on the tproxy port, the iptables TPROXY target drops (fail-closed).

    xt_TPROXY finds no socket and returns NF_DROP: the client's SYN is never
    answered, the connection attempt times out, and the origin is never
    reached, although it listens on port 80. Port 8080 (not diverted) still works.
    """
    with Lab() as lab:
        lab.apply_rules(render_iptables([DivertPort(3129, (80,))]))
        lab.start_origin((80, 8080))
        diverted = lab.run(
            lab.client,
            ["curl", "-sS", "--connect-timeout", "2", "--max-time", "5", url(origin_ip, 80, "/ip")],
            check=False,
        )
        assert diverted.returncode == 28, diverted  # curl: operation timed out
        direct = lab.run(
            lab.client, ["curl", "-sS", "--max-time", "5", url(origin_ip, 8080, "/ip")]
        )
        assert json.loads(direct.stdout)["client"] == client_ip


# -- interception ------------------------------------------------------------------


@FAMILIES
def test_tproxy_listener_sees_original_destination(
    lab: Lab, curl, tproxy_listener, client_ip: str, origin_ip: str
) -> None:
    """A transparent listener on [::]:3129 gets the diverted connection; getsockname() is
    the original destination (origin, 80) and the peer is the client."""
    tproxy_listener("report")
    result = curl(url(origin_ip, 80, "/"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sockname"] == [origin_ip, 80]
    assert report["peername"][0] == client_ip


@pytest.mark.parametrize(
    "unreachable_ip", [Lab.UNREACHABLE4, Lab.UNREACHABLE6], ids=["ipv4", "ipv6"]
)
def test_diverted_connection_to_silent_address_is_still_intercepted(
    lab: Lab, curl, tproxy_listener, unreachable_ip: str
) -> None:
    """Interception happens in the router: the original destination need not exist."""
    tproxy_listener("report")
    result = curl(url(unreachable_ip, 80, "/"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sockname"] == [unreachable_ip, 80]


@FAMILIES
def test_spoofed_upstream_connection_returns_through_router(
    lab: Lab, curl, tproxy_listener, client_ip: str, origin_ip: str
) -> None:
    """The full TPROXY path: an upstream connection bound to the client's address
    reaches the origin, which sees the client's IP, and its replies come back to
    the relay (the ``socket transparent`` rule), not to the client."""
    tproxy_listener("relay")
    result = curl(url(origin_ip, 80, "/"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "error" not in report, report["error"]
    assert report["upstream_local"][0] == client_ip
    assert report["upstream"]["client"] == client_ip
    assert report["upstream"]["port"] == report["upstream_local"][1]


def test_undiverted_port_bypasses_tproxy_listener(lab: Lab, curl, tproxy_listener) -> None:
    """Only the configured destination ports are diverted, even with a listener up."""
    tproxy_listener("report")
    result = curl(url(Lab.ORIGIN4, 8080, "/ip"))
    answer = json.loads(result.stdout)
    assert "sockname" not in answer  # not the listener's report: the origin answered
    assert answer["client"] == Lab.CLIENT4


# -- the rules scripts on a real kernel ----------------------------------------------


def _state(lab: Lab, tables: list[list[str]]) -> str:
    parts = []
    for argv in [
        *tables,
        ["ip", "-4", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "-4", "route", "show", "table", "100"],
        ["ip", "-6", "route", "show", "table", "100"],
    ]:
        out = lab.run(lab.router, argv, check=False).stdout.decode()
        parts.append("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    return "\n---\n".join(parts)


def test_nftables_script_is_idempotent() -> None:
    """Applying the nftables script twice leaves exactly the state of applying it once."""
    script = render_nftables([DivertPort(3129, (80, 443)), DivertPort(3130, (8081,))])
    with Lab() as lab:
        lab.apply_rules(script)
        once = _state(lab, [["nft", "list", "ruleset"]])
        lab.apply_rules(script)
        twice = _state(lab, [["nft", "list", "ruleset"]])
    assert once == twice
    assert once.count("fwmark 0x1 lookup 100") == 2  # one IPv4 rule, one IPv6 rule
    assert "tproxy ip to :3129" in once and "tproxy ip6 to :3130" in once
    assert once.count("local default dev lo") == 2


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed")
def test_iptables_script_is_idempotent() -> None:
    """Applying the iptables script twice leaves exactly the state of applying it once."""
    script = render_iptables([DivertPort(3129, (80, 443))])
    saves = [["iptables-save", "-t", "mangle"], ["ip6tables-save", "-t", "mangle"]]
    with Lab() as lab:
        lab.apply_rules(script)
        once = _state(lab, saves)
        lab.apply_rules(script)
        twice = _state(lab, saves)
    assert once == twice
    assert once.count("-A PREROUTING -j TPROXY_TWIST") == 2
    assert once.count("--on-port 3129") == 4
    assert once.count("fwmark 0x1 lookup 100") == 2


def test_ipv4_only_nftables_script_leaves_ipv6_alone() -> None:
    with Lab() as lab:
        lab.apply_rules(render_nftables([DivertPort(3129)], ipv4_only=True))
        state = _state(lab, [["nft", "list", "ruleset"]])
    assert "tproxy ip to :3129" in state
    assert "ip6" not in state.split("---")[0]
    assert state.count("fwmark 0x1 lookup 100") == 1


# -- the lab's own housekeeping -------------------------------------------------------


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout
    return [line.split()[0] for line in out.decode().splitlines() if line.strip()]


def test_teardown_kills_untracked_processes_and_deletes_namespaces() -> None:
    lab = Lab()
    lab.setup()
    try:
        # Not started through lab.popen: teardown must find it via `ip netns pids`.
        stray = subprocess.Popen(["ip", "netns", "exec", lab.origin, "sleep", "600"])
    finally:
        lab.teardown()
    assert stray.wait(timeout=10) != 0
    assert not set(lab.namespaces) & set(_namespaces())
    lab.teardown()  # a second teardown is harmless


def test_cleanup_stale_removes_only_labs_whose_owner_is_gone(lab: Lab) -> None:
    crashed = Lab()
    crashed.setup()
    try:
        (OWNERS_DIR / crashed.prefix).write_text("999999999 0\n")  # a pid that cannot exist
        removed = cleanup_stale()
        # Other labs whose owner really is gone (a killed test run on this shared
        # machine) may go too; the crashed one must, and no live one may.
        assert set(crashed.namespaces) <= set(removed)
        assert not set(lab.namespaces) & set(removed)
        remaining = _namespaces()
        assert not set(crashed.namespaces) & set(remaining)
        assert set(lab.namespaces) <= set(remaining)  # the running session's lab stays
    finally:
        crashed.teardown()


def test_wait_port_times_out_on_closed_port(lab: Lab) -> None:
    with pytest.raises(TimeoutError):
        lab.wait_port(lab.client, Lab.ORIGIN4, 9, timeout=0.3)


# -- the origin server ------------------------------------------------------------------


def test_origin_keeps_connection_alive_across_requests(lab: Lab, client_python) -> None:
    out = client_python(
        "import http.client, json\n"
        f"c = http.client.HTTPConnection({Lab.ORIGIN4!r}, 8080, timeout=10)\n"
        "for _ in range(3):\n"
        "    c.request('GET', '/ip')\n"
        "    print(c.getresponse().read().decode().strip())\n"
    )
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["requests_on_connection"] for a in answers] == [1, 2, 3]
    assert len({a["connection_id"] for a in answers}) == 1
    assert len({a["port"] for a in answers}) == 1
    assert {a["client"] for a in answers} == {Lab.CLIENT4}


def test_origin_answers_pipelined_requests_in_order(lab: Lab, client_python) -> None:
    out = client_python(
        "import socket, sys\n"
        f"s = socket.create_connection(({Lab.ORIGIN4!r}, 8080), timeout=10)\n"
        "s.sendall(b'GET /sleep?s=0.2 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n'\n"
        "          b'GET /status/201 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n'\n"
        "          b'HEAD /bytes?n=10 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n'\n"
        "          b'GET /status/204 HTTP/1.1\\r\\nHost: o\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        "sys.stdout.write(data.decode())\n"
    )
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("HTTP/1.1 ")]
    assert statuses == ["200", "201", "200", "204"]
    assert '"slept": 0.2' in out.split("HTTP/1.1 201")[0]


def test_origin_echoes_chunked_body_with_trailers(lab: Lab, client_python) -> None:
    out = client_python(
        "import socket\n"
        f"s = socket.create_connection(({Lab.ORIGIN4!r}, 8080), timeout=10)\n"
        "s.sendall(b'POST /echo HTTP/1.1\\r\\nHost: o\\r\\nTransfer-Encoding: chunked\\r\\n'\n"
        "          b'Connection: close\\r\\n\\r\\n'\n"
        "          b'5\\r\\nhello\\r\\n6;ext=1\\r\\n world\\r\\n0\\r\\nX-Check: yes\\r\\n\\r\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        "print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    )
    assert json.loads(out) == {
        "length": 11,
        "sha256": hashlib.sha256(b"hello world").hexdigest(),
        "framing": "chunked",
        "trailers": [["X-Check", "yes"]],
    }


def test_origin_sends_100_continue_before_reading_body(lab: Lab, curl) -> None:
    result = curl(
        "-v", "-H", "Expect: 100-continue", "--data-binary", "abc", url(Lab.ORIGIN4, 8080, "/echo")
    )
    assert b"HTTP/1.1 100 Continue" in result.stderr
    assert json.loads(result.stdout)["sha256"] == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("query", ["", "&chunked=1&chunk=1000"], ids=["length", "chunked"])
def test_origin_bytes_match_expected_sha256(lab: Lab, curl, query: str) -> None:
    n = 3_000_001
    result = curl("-D", "/dev/stderr", url(Lab.ORIGIN4, 8080, f"/bytes?n={n}&seed=s1{query}"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == n
    assert hashlib.sha256(result.stdout).hexdigest() == expected_sha256(n, "s1")
    framing = b"transfer-encoding: chunked" if query else b"content-length: 3000001"
    assert framing in result.stderr.lower()


def test_origin_close_delimited_body(lab: Lab, curl) -> None:
    result = curl("-D", "/dev/stderr", url(Lab.ORIGIN6, 8080, "/close?n=70000"))
    assert hashlib.sha256(result.stdout).hexdigest() == expected_sha256(70000)
    headers = result.stderr.lower()
    assert b"content-length" not in headers and b"transfer-encoding" not in headers


def test_origin_head_and_status(lab: Lab, curl) -> None:
    head = curl("-I", url(Lab.ORIGIN4, 8080, "/bytes?n=1234"))
    assert b"Content-Length: 1234" in head.stdout
    for code in ("204", "404", "503"):
        result = curl(
            "-o", "/dev/null", "-w", "%{http_code}", url(Lab.ORIGIN4, 8080, f"/status/{code}")
        )
        assert result.stdout.decode() == code


def test_origin_echoes_bytes_after_upgrade(lab: Lab, client_python) -> None:
    out = client_python(
        "import socket\n"
        f"s = socket.create_connection(({Lab.ORIGIN6!r}, 8080), timeout=10)\n"
        "s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: o\\r\\nUpgrade: websocket\\r\\n'\n"
        "          b'Connection: Upgrade\\r\\n\\r\\n')\n"
        "head = b''\n"
        "while b'\\r\\n\\r\\n' not in head:\n"
        "    head += s.recv(1)\n"
        "s.sendall(b'ping')\n"
        "echo = b''\n"
        "while len(echo) < 4:\n"
        "    echo += s.recv(4)\n"
        "s.shutdown(socket.SHUT_WR)\n"
        "print(head.split(b'\\r\\n')[0].decode(), echo.decode(), s.recv(10) == b'')\n"
    )
    assert out.split() == ["HTTP/1.1", "101", "Switching", "Protocols", "ping", "True"]
