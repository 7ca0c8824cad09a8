"""
The transparent relay end to end: client -> router (nftables TPROXY ->
twistd tproxy) -> origin, in network namespaces, through the real kernel path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest

from tproxy_twist.lab import Lab
from tproxy_twist.lab.origin import expected_sha256

CONFIG = """
[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 3
response = 5

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["198.51.100.0/24", "2001:db8:1::/64"]
connect_ports = [8080]
stream_relay = "splice"

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
"""

ORIGIN = f"http://{Lab.ORIGIN4}"
ORIGIN6 = f"http://[{Lab.ORIGIN6}]"


@pytest.fixture
def running(proxy):
    return proxy(CONFIG)


def get_json(curl, *args: str) -> dict:
    result = curl(*args)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_origin_sees_the_clients_own_ipv4_address(running, curl):
    result = curl("-D", "-", f"{ORIGIN}/ip")
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert json.loads(body)["client"] == Lab.CLIENT4
    assert b"Via: 1.1 " in head and b"(tproxy-twist)" in head


def test_origin_sees_the_clients_own_ipv6_address(running, curl):
    assert get_json(curl, "-g", f"{ORIGIN6}/ip")["client"] == Lab.CLIENT6


def test_the_origin_never_sees_hop_by_hop_headers_and_sees_our_via(running, curl):
    seen = get_json(
        curl, "-H", "Connection: X-Private", "-H", "X-Private: 1", "-H", "Keep-Alive: 5",
        f"{ORIGIN}/headers",
    )  # fmt: skip
    names = {name.lower() for name, _ in seen["headers"]}
    assert "x-private" not in names and "keep-alive" not in names
    via = [v for n, v in seen["headers"] if n.lower() == "via"]
    assert via and via[0].startswith("1.1 ") and via[0].endswith("(tproxy-twist)")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_5mb_upload_arrives_byte_identical(running, curl, tmp_path, chunked):
    body = os.urandom(5 * 1024 * 1024)
    path = tmp_path / "upload"
    path.write_bytes(body)
    args = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    echo = get_json(curl, *args, "--data-binary", f"@{path}", f"{ORIGIN}/echo")
    assert echo["length"] == len(body)
    assert echo["sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["framing"] == ("chunked" if chunked else "length")


def test_a_20mb_chunked_download_arrives_whole(running, curl, tmp_path):
    n = 20 * 1024 * 1024
    out = tmp_path / "download"
    result = curl("-o", str(out), "-D", "-", f"{ORIGIN}/bytes?n={n}&chunked=1&seed=20")
    assert result.returncode == 0, result.stderr.decode()
    assert b"Transfer-Encoding: chunked" in result.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(n, "20")


def test_a_close_delimited_download_arrives_whole(running, curl, tmp_path):
    out = tmp_path / "download"
    result = curl("-o", str(out), f"{ORIGIN}/close?n=1000000")
    assert result.returncode == 0, result.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(1000000)


def test_three_requests_share_one_client_connection_and_one_upstream(running, client_python):
    out = client_python(
        f"""
import http.client, json
conn = http.client.HTTPConnection("{Lab.ORIGIN4}", 80, timeout=10)
for _ in range(3):
    conn.request("GET", "/ip")
    response = conn.getresponse()
    print(json.dumps([response.status, json.loads(response.read()), conn.sock.getsockname()]))
"""
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert [status for status, _, _ in rows] == [200, 200, 200]
    assert len({tuple(sock) for _, _, sock in rows}) == 1  # one client connection
    assert len({seen["connection_id"] for _, seen, _ in rows}) == 1  # one upstream
    assert [seen["requests_on_connection"] for _, seen, _ in rows] == [1, 2, 3]


def test_pipelined_requests_are_answered_in_order(running, client_python):
    out = client_python(
        f"""
import socket
s = socket.create_connection(("{Lab.ORIGIN4}", 80), timeout=10)
s.sendall(b"GET /status/201 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n"
          b"GET /status/202 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n"
          b"GET /status/203 HTTP/1.1\\r\\nHost: o\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
import re
print([code.decode() for code in re.findall(rb"HTTP/1.1 (\\d+) ", data)])
"""
    )
    assert out.strip() == "['201', '202', '203']"


def test_websocket_upgrade_becomes_a_tunnel(running, client_python, lab):
    out = client_python(
        f"""
import socket
s = socket.create_connection(("{Lab.ORIGIN4}", 80), timeout=10)
s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: o\\r\\n"
          b"Connection: Upgrade\\r\\nUpgrade: websocket\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(1)
s.sendall(b"ping over the tunnel")
echo = b""
while len(echo) < 20:
    echo += s.recv(100)
print(head.split(b"\\r\\n")[0].decode(), echo.decode())
"""
    )
    assert out.strip() == "HTTP/1.1 101 Switching Protocols ping over the tunnel"
    # The port's stream_relay is the default: the tunnel's bytes were copied by the pump.
    assert streams(lab)[("transparent", "copy")] == 1.0
    assert streams(lab)[("transparent", "splice")] == 0.0


def test_forward_port_relays_absolute_urls_from_the_routers_address(running, curl):
    seen = get_json(
        curl, "-x", f"http://{Lab.ROUTER_CLIENT4}:3128", f"http://{Lab.ORIGIN4}:8080/ip"
    )
    assert seen["client"] == Lab.ROUTER_ORIGIN4


def test_forward_port_tunnels_connect_to_allowed_ports(running, curl):
    seen = get_json(
        curl, "-p", "-x", f"http://{Lab.ROUTER_CLIENT4}:3128", f"http://{Lab.ORIGIN4}:8080/ip"
    )
    assert seen["client"] == Lab.ROUTER_ORIGIN4


def streams(lab: Lab) -> dict[tuple[str, str], float]:
    """tproxy_streams_total by (port, how)."""
    time.sleep(0.5)  # workers hand their counts to /metrics a few times a second
    text = lab.run(lab.router, ["curl", "-s", "http://127.0.0.1:9464/metrics"]).stdout.decode()
    found = re.findall(r'^tproxy_streams_total\{how="(\w+)",port="(\w+)"\} (\S+)$', text, re.M)
    return {(port, how): float(value) for how, port, value in found}


def test_a_connect_tunnel_is_spliced_and_a_20mb_download_through_it_arrives_whole(
    running, curl, lab, tmp_path
):
    n = 20 * 1024 * 1024
    out = tmp_path / "download"
    result = curl(
        "-p", "-x", f"http://{Lab.ROUTER_CLIENT4}:3128", "-o", str(out),
        f"http://{Lab.ORIGIN4}:8080/bytes?n={n}&seed=21",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(n, "21")
    # Relayed with splice(2), not through the worker.
    assert streams(lab)[("forward", "splice")] == 1.0
    assert streams(lab)[("forward", "copy")] == 0.0


def test_a_client_half_close_in_a_spliced_tunnel_still_gets_the_whole_answer(
    running, client_python, lab
):
    out = client_python(
        f"""
import hashlib, socket
s = socket.create_connection(("{Lab.ROUTER_CLIENT4}", 3128), timeout=10)
s.sendall(b"CONNECT {Lab.ORIGIN4}:8080 HTTP/1.1\\r\\nHost: {Lab.ORIGIN4}:8080\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += s.recv(1)
s.sendall(b"GET /close?n=3000000 HTTP/1.1\\r\\nHost: o\\r\\n\\r\\n")
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(1 << 16):
    data += chunk
print(head.split(b" ")[1].decode(), hashlib.sha256(data.split(b"\\r\\n\\r\\n", 1)[1]).hexdigest())
"""
    )
    assert out.split() == ["200", expected_sha256(3000000)]
    assert streams(lab)[("forward", "splice")] == 1.0


def test_unreachable_origin_is_answered_within_the_connect_timeout(running, curl):
    started = time.monotonic()
    result = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{Lab.UNREACHABLE4}/")
    elapsed = time.monotonic() - started
    assert result.stdout in (b"502", b"504")
    assert elapsed < 3 + 2  # the configured connect timeout, plus slack for a busy machine


def test_refused_origin_port_gets_502(running, client_python):
    # Port 80 is diverted; the origin answers it. Divert a port with nobody behind
    # it by asking the forward port instead, where we pick any destination port.
    out = client_python(
        f"""
import urllib.request
proxy = urllib.request.ProxyHandler({{"http": "http://{Lab.ROUTER_CLIENT4}:3128"}})
try:
    urllib.request.build_opener(proxy).open("http://{Lab.ORIGIN4}:81/", timeout=10)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"""
    )
    assert out.startswith("502 cannot connect to 203.0.113.2:81: connection refused")


def test_a_direct_connection_to_the_tproxy_port_is_refused(running, curl):
    result = curl("-i", f"http://{Lab.ROUTER_CLIENT4}:3129/")
    assert result.stdout.startswith(b"HTTP/1.1 403 ")
    assert b"only serves intercepted traffic" in result.stdout


def test_metrics_count_what_went_through_each_port(running, curl, lab):
    for _ in range(3):
        curl(f"{ORIGIN}/ip")
    curl("-x", f"http://{Lab.ROUTER_CLIENT4}:3128", f"http://{Lab.ORIGIN4}:8080/ip")
    time.sleep(0.5)  # workers hand their counts to /metrics a few times a second
    metrics = lab.run(lab.router, ["curl", "-s", "http://127.0.0.1:9464/metrics"]).stdout.decode()
    assert (
        'tproxy_requests_total{code="200",method="GET",mode="tproxy",port="transparent"} 3.0'
        in metrics
    )
    assert (
        'tproxy_requests_total{code="200",method="GET",mode="forward",port="forward"} 1.0'
        in metrics
    )


def test_metrics_negotiate_openmetrics_and_healthz_reports_ready(running, lab):
    def get(*args):
        return lab.run(lab.router, ["curl", "-s", *args]).stdout.decode()

    openmetrics = "Accept: application/openmetrics-text; version=1.0.0"
    head = get("-D", "-", "-o", "/dev/null", "-H", openmetrics, "http://127.0.0.1:9464/metrics")
    assert "content-type: application/openmetrics-text" in head.lower()
    head = get("-D", "-", "-o", "/dev/null", "http://127.0.0.1:9464/metrics")
    assert "content-type: text/plain" in head.lower()
    assert get("http://127.0.0.1:9464/healthz").endswith("workers ready, generation 1\n")


def test_a_tproxy_port_without_spoofing_connects_from_the_routers_address(proxy, curl):
    proxy(CONFIG.replace('mode = "tproxy"', 'mode = "tproxy"\nspoof_client_ip = false'))
    assert get_json(curl, f"{ORIGIN}/ip")["client"] == Lab.ROUTER_ORIGIN4


def test_an_intercept_port_relays_nat_redirected_traffic_to_its_original_destination(
    proxy, lab, curl
):
    config = CONFIG + '\n[[port]]\nname = "nat"\nlisten = "0.0.0.0:3130"\nmode = "intercept"\n'
    proxy(config)
    nat = (
        "table ip tproxy_twist_test_nat {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        "    tcp dport 8080 redirect to :3130\n"
        "  }\n"
        "}\n"
    )
    lab.run(lab.router, ["nft", "-f", "-"], input=nat.encode())
    try:
        result = curl("-D", "-", f"{ORIGIN}:8080/ip")
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        assert b"(tproxy-twist)" in head  # it went through the proxy
        # Original destination from SO_ORIGINAL_DST; no spoofing on intercept ports by default.
        assert json.loads(body)["client"] == Lab.ROUTER_ORIGIN4
        # A connection that was not redirected has no original destination: refused.
        direct = curl("-i", f"http://{Lab.ROUTER_CLIENT4}:3130/")
        assert direct.stdout.startswith(b"HTTP/1.1 403 ")
    finally:
        lab.run(lab.router, ["nft", "delete", "table", "ip", "tproxy_twist_test_nat"], check=False)
