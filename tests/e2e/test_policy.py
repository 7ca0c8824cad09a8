"""
Proxy policy end to end (issue 11): credentials stay with the proxy, no path
to the router itself, destination rules, Via control, proxy authentication,
the forward port on IPv6.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from tproxy_twist.lab import Lab

CLIENTS = '["198.51.100.0/24", "2001:db8:1::/64"]'
# Names the router resolves (its own /etc/hosts, see Lab.set_hosts).
HOSTS = {
    "origin.policy.example": Lab.ORIGIN4,
    "router.policy.example": Lab.ROUTER_CLIENT4,
    "router6.policy.example": Lab.ROUTER_ORIGIN6,
    "metadata.policy.example": "169.254.169.254",
    "loop.policy.example": "127.0.0.2",
}
METRICS_URL = "http://127.0.0.1:9464/metrics"  # in the router namespace

POLICY = f"""
workers = 1
visible_hostname = "gw.policy.example"

[metrics]
listen = "127.0.0.1:9464"

[access_log]
path = "{{access_log}}"
format = "json"

[timeouts]
connect = 3
response = 5

[[port]]
name = "forward"
listen = "[::]:3128"
mode = "forward"
allow = {CLIENTS}
connect_ports = [443, 8080]

[[port]]
name = "novia"
listen = "[::]:3127"
mode = "forward"
allow = {CLIENTS}
via = false

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
via = false
"""

RULES = f"""
workers = 1

[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 3

[[port]]
name = "forward"
listen = "[::]:3128"
mode = "forward"
allow = {CLIENTS}
deny_destinations = ["[{Lab.ORIGIN6}]:8080"]
allow_destinations = ["203.0.113.0/24:80,8080", "[2001:db8:2::/64]:8080-8090"]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
deny_destinations = ["{Lab.ORIGIN4}:80"]
"""

AUTH = f"""
workers = 1

[metrics]
listen = "127.0.0.1:9464"

[access_log]
path = "{{access_log}}"
format = "json"

[[port]]
name = "forward"
listen = "[::]:3128"
mode = "forward"
allow = {CLIENTS}
connect_ports = [8080]
auth = {{{{ htpasswd = "{{htpasswd}}", realm = "Policy lab" }}}}
"""

FORWARD = f"http://{Lab.ROUTER_CLIENT4}:3128"
NOVIA = f"http://{Lab.ROUTER_CLIENT4}:3127"

# Sends raw requests (JSON list on stdin) each on a new connection to the proxy
# at argv[1]:argv[2] (from argv[3] if given); prints [[status line, head, body], ...].
RAW = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
out = []
for request in json.loads(sys.stdin.read()):
    s = socket.create_connection((host, port), timeout=10, source_address=source)
    s.sendall(request.encode("latin-1"))
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        length = [int(l.split(b":", 1)[1]) for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length:")]
        if request.startswith("CONNECT") and b" 200 " in status:
            pass  # a tunnel: nothing more until we speak
        elif length:
            while len(body) < length[0] and (chunk := s.recv(65536)):
                body += chunk
        else:
            while chunk := s.recv(65536):
                body += chunk
    except OSError as e:
        head, body = data, repr(e).encode()
    s.close()
    out.append([head.split(b"\r\n", 1)[0].decode("latin-1"), head.decode("latin-1"),
                body.decode("latin-1")])
print(json.dumps(out))
"""


def raw(lab: Lab, requests: list[str], host=Lab.ROUTER_CLIENT4, port=3128, source=None):
    argv = [sys.executable, "-c", RAW, host, str(port)] + ([source] if source else [])
    proc = lab.run(lab.client, argv, input=json.dumps(requests).encode(), check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def get(url: str, *fields: str) -> str:
    host = re.match(r"http://([^/]+)", url).group(1)
    return (
        f"GET {url} HTTP/1.1\r\nHost: {host}\r\n"
        + "".join(f + "\r\n" for f in fields)
        + ("Connection: close\r\n\r\n")
    )


def connect(authority: str, *fields: str) -> str:
    extra = "".join(f + "\r\n" for f in fields)
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n"


def metric(lab: Lab, name: str, **labels: str) -> float:
    text = lab.run(lab.router, ["curl", "-s", METRICS_URL]).stdout.decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and line.split("}")[0][len(name) + 1 :] == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(lab: Lab, value: float, name: str, **labels: str) -> float:
    deadline = time.monotonic() + 10
    while (seen := metric(lab, name, **labels)) != value and time.monotonic() < deadline:
        time.sleep(0.1)  # workers hand their counts over a few times a second
    return seen


def seen_headers(body: str) -> dict[str, str]:
    return {name.lower(): value for name, value in json.loads(body)["headers"]}


@pytest.fixture
def hosts(lab: Lab):
    lab.set_hosts(lab.router, HOSTS)
    yield HOSTS
    lab.set_hosts(lab.router, None)


@pytest.fixture
def policy(proxy, hosts, tmp_path):
    return proxy(POLICY.format(access_log=tmp_path / "access.log"))


# --- credentials stay with the proxy -----------------------------------------------------------


def test_the_origin_never_sees_proxy_credentials_on_forward_and_tproxy_ports(policy, lab):
    fields = ("Proxy-Authorization: Basic YWxpY2U6c2VjcmV0", "Proxy-Connection: keep-alive")
    answers = raw(lab, [get(f"http://{Lab.ORIGIN4}:8080/headers", *fields)])
    answers += raw(lab, [get(f"http://{Lab.ORIGIN4}/headers", *fields)], host=Lab.ORIGIN4, port=80)
    for status, _, body in answers:
        assert status == "HTTP/1.1 200 OK"
        seen = seen_headers(body)
        assert "proxy-authorization" not in seen and "proxy-connection" not in seen
        assert "YWxpY2U6c2VjcmV0" not in body


# --- no path to the router itself ---------------------------------------------------------------

REFUSED_URLS = [
    ("http://127.0.0.1:9464/metrics", "127.0.0.1 is a loopback address"),
    ("http://[::1]:9464/metrics", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]:9464/metrics", "127.0.0.1 is a loopback address"),
    ("http://localhost:9464/metrics", "localhost resolves to a refused address"),
    ("http://loop.policy.example:9464/metrics", "127.0.0.2 is a loopback address"),
    ("http://0.0.0.0:9464/metrics", "0.0.0.0 is an unspecified address"),
    (f"http://{Lab.ROUTER_CLIENT4}:3128/", "198.51.100.1 is an address of the proxy's host"),
    (f"http://{Lab.ROUTER_ORIGIN4}:9464/", "203.0.113.1 is an address of the proxy's host"),
    (f"http://[{Lab.ROUTER_ORIGIN6}]:3128/", "2001:db8:2::1 is an address of the proxy's host"),
    ("http://router.policy.example:3128/", "198.51.100.1 is an address of the proxy's host"),
    ("http://router6.policy.example:3128/", "2001:db8:2::1 is an address of the proxy's host"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://metadata.policy.example/latest/", "169.254.169.254 is a link-local address"),
    ("http://[fe80::1]/", "fe80::1 is a link-local address"),
]
REFUSED_CONNECTS = [
    ("127.0.0.1:443", "127.0.0.1 is a loopback address"),
    ("[::1]:443", "::1 is a loopback address"),
    ("localhost:443", "localhost resolves to a refused address"),
    (f"{Lab.ROUTER_CLIENT4}:443", "198.51.100.1 is an address of the proxy's host"),
    ("router.policy.example:443", "198.51.100.1 is an address of the proxy's host"),
    ("169.254.169.254:443", "169.254.169.254 is a link-local address"),
    ("metadata.policy.example:443", "169.254.169.254 is a link-local address"),
    ("[fe80::1]:443", "fe80::1 is a link-local address"),
]


def test_the_router_itself_and_link_local_are_refused_plain_and_connect(policy, lab):
    before = metric(lab, "tproxy_rejected_total", port="forward", reason="destination")
    requests = [get(url) for url, _ in REFUSED_URLS]
    requests += [connect(authority) for authority, _ in REFUSED_CONNECTS]
    answers = raw(lab, requests)
    reasons = [why for _, why in REFUSED_URLS + REFUSED_CONNECTS]
    for (status, _, body), why, request in zip(answers, reasons, requests, strict=True):
        assert status == "HTTP/1.1 403 Forbidden", (request, status, body)
        assert why in body, (request, body)
        assert "tproxy_requests_total" not in body  # the metrics never leaked
    expected = before + len(requests)
    assert (
        wait_metric(lab, expected, "tproxy_rejected_total", port="forward", reason="destination")
        == expected
    )
    # The reason is logged too (repeats within 10 s are counted, not logged).
    assert f"refusing a request from {Lab.CLIENT4}: {REFUSED_URLS[0][1]}" in policy.log_text()


def test_names_and_literals_that_are_not_the_router_still_work(policy, lab):
    answers = raw(
        lab,
        [
            get("http://origin.policy.example:8080/ip"),
            connect("origin.policy.example:8080"),
            get(f"http://[{Lab.ORIGIN6}]:8080/ip"),
        ],
    )
    assert [a[0] for a in answers] == [
        "HTTP/1.1 200 OK",
        "HTTP/1.1 200 Connection established",
        "HTTP/1.1 200 OK",
    ]
    assert json.loads(answers[0][2])["client"] == Lab.ROUTER_ORIGIN4
    assert json.loads(answers[2][2])["client"] == Lab.ROUTER_ORIGIN6


def test_the_forward_port_listens_on_ipv6(policy, curl):
    result = curl("-x", f"http://[{Lab.ROUTER_CLIENT6}]:3128", f"http://[{Lab.ORIGIN6}]:8080/ip")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["client"] == Lab.ROUTER_ORIGIN6


# --- destination rules --------------------------------------------------------------------------


def test_allow_and_deny_destinations_act_as_written_including_ports(proxy, lab):
    proxy(RULES)
    answers = raw(
        lab,
        [
            get(f"http://{Lab.ORIGIN4}:8080/ip"),  # allowed by 203.0.113.0/24:80,8080
            get(f"http://{Lab.ORIGIN4}:80/ip"),  # ... port 80 too
            get(f"http://{Lab.ORIGIN4}:81/ip"),  # not in the allow list
            get(f"http://[{Lab.ORIGIN6}]:8080/ip"),  # denied first, though allowed after
            get(f"http://[{Lab.ORIGIN6}]:80/ip"),  # 2001:db8:2::/64 only on 8080-8090
            connect(f"{Lab.ORIGIN4}:443"),  # CONNECT: the same rules (and connect_ports)
        ],
    )
    statuses = [a[0].split(" ", 2)[1] for a in answers]
    assert statuses == ["200", "200", "403", "403", "403", "403"]
    assert "203.0.113.2:81 is not in this port's allow_destinations" in answers[2][2]
    assert f"is denied by deny_destinations '[{Lab.ORIGIN6}]:8080'" in answers[3][2]
    assert "[2001:db8:2::2]:80 is not in this port's allow_destinations" in answers[4][2]
    # The tproxy port applies its rules to the original destination.
    diverted = raw(lab, [get(f"http://{Lab.ORIGIN4}/ip")], host=Lab.ORIGIN4, port=80)
    assert diverted[0][0] == "HTTP/1.1 403 Forbidden"
    assert "203.0.113.2:80 is denied by deny_destinations" in diverted[0][2]
    diverted6 = raw(lab, [get(f"http://[{Lab.ORIGIN6}]/ip")], host=Lab.ORIGIN6, port=80)
    assert json.loads(diverted6[0][2])["client"] == Lab.CLIENT6
    assert wait_metric(lab, 5.0, "tproxy_rejected_total", port="forward", reason="destination")
    assert wait_metric(lab, 1.0, "tproxy_rejected_total", port="transparent", reason="destination")


# --- Via ------------------------------------------------------------------------------------------


def test_via_names_the_visible_hostname_and_via_false_sends_none(policy, lab):
    with_via, without = raw(lab, [get(f"http://{Lab.ORIGIN4}:8080/headers")]) + raw(
        lab, [get(f"http://{Lab.ORIGIN4}:8080/headers")], port=3127
    )
    assert seen_headers(with_via[2])["via"] == "1.1 gw.policy.example (tproxy-twist)"
    assert "via: 1.1 gw.policy.example (tproxy-twist)" in with_via[1].lower()
    assert "via" not in seen_headers(without[2])
    assert "via:" not in without[1].lower()
    tproxied = raw(lab, [get(f"http://{Lab.ORIGIN4}/headers")], host=Lab.ORIGIN4, port=80)[0]
    assert "via" not in seen_headers(tproxied[2]) and "via:" not in tproxied[1].lower()


def test_with_via_false_a_default_nginx_compresses_again(policy, lab, nginx):
    url = f"http://{Lab.ORIGIN4}:{nginx}/app.js"

    def fetch(proxy_url: str) -> tuple[str, int]:
        result = lab.run(
            lab.client,
            ["curl", "-s", "-x", proxy_url, "-H", "Accept-Encoding: gzip", "-D", "-",
             "-o", "/dev/null", "-w", "%{size_download}", url],
        )  # fmt: skip
        text = result.stdout.decode()
        return text.lower(), int(text.rsplit("\n", 1)[-1])

    direct_head, direct_size = fetch(NOVIA)
    via_head, via_size = fetch(FORWARD)
    assert "content-encoding: gzip" in direct_head
    assert "content-encoding" not in via_head  # nginx's gzip_proxied off sees our Via
    assert via_size > 150_000 and direct_size < via_size / 3
    print(f"\nnginx app.js through via=true: {via_size} B; via=false: {direct_size} B (gzip)")


def test_an_upstream_proxy_challenge_never_reaches_the_client(policy, lab, nginx):
    answers = raw(lab, [get(f"http://{Lab.ORIGIN4}:{nginx}/challenge")])
    assert answers[0][0] == "HTTP/1.1 200 OK"
    assert "proxy-authenticate" not in answers[0][1].lower()


# --- proxy authentication -------------------------------------------------------------------------

USERS = {"alice": "wonderland", "bob": "builder"}


def htpasswd_line(user: str, password: str, cost: int = 5) -> str:
    # As `htpasswd -B` writes it ($2y$, cost 5 by default).
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    return f"{user}:$2y${hashed[4:]}\n"


@pytest.fixture
def htpasswd(tmp_path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text("".join(htpasswd_line(u, p) for u, p in USERS.items()))
    return path


@pytest.fixture
def authenticating(proxy, htpasswd, tmp_path):
    return proxy(AUTH.format(access_log=tmp_path / "access.log", htpasswd=htpasswd))


def basic(user: str, password: str) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def access_log(tmp_path: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:
        path = tmp_path / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    return [json.loads(line) for line in lines]


def test_the_407_flow_with_curl_proxy_user(authenticating, lab, curl, tmp_path):
    url = f"http://{Lab.ORIGIN4}:8080/headers"
    missing = curl("-s", "-D", "-", "-x", FORWARD, url)
    assert missing.stdout.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="Policy lab"' in missing.stdout
    wrong = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", FORWARD,
                 "--proxy-user", "alice:nope", url)  # fmt: skip
    assert wrong.stdout == b"407"
    right = curl("-s", "-x", FORWARD, "--proxy-user", "alice:wonderland", url)
    assert right.returncode == 0, right.stderr.decode()
    assert "proxy-authorization" not in seen_headers(right.stdout.decode())
    ip = f"http://{Lab.ORIGIN4}:8080/ip"
    tunnel = curl("-s", "-p", "-x", FORWARD, "--proxy-user", "bob:builder", ip)
    assert json.loads(tunnel.stdout)["client"] == Lab.ROUTER_ORIGIN4
    refused = curl("-s", "-p", "-x", FORWARD, "-w", "%{http_connect}", ip)
    assert refused.stdout.endswith(b"407")
    entries = access_log(tmp_path, 5)  # the tunnel's line comes when it closes: any order
    assert sorted((e["status"], e["user"] or "-") for e in entries) == [
        (200, "alice"),
        (200, "bob"),
        (407, "-"),
        (407, "-"),
        (407, "-"),
    ]
    assert wait_metric(lab, 3.0, "tproxy_rejected_total", port="forward", reason="auth") == 3.0
    metrics = lab.run(lab.router, ["curl", "-s", METRICS_URL]).stdout.decode()
    assert "alice" not in metrics and "bob" not in metrics  # never a label


def test_the_htpasswd_file_is_read_again_on_sighup(authenticating, htpasswd, lab, curl):
    url = f"http://{Lab.ORIGIN4}:8080/ip"

    def status(user: str) -> bytes:
        return curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", FORWARD,
                    "--proxy-user", user, url).stdout  # fmt: skip

    assert status("carol:secret") == b"407"
    htpasswd.write_text(htpasswd.read_text() + htpasswd_line("carol", "secret"))
    authenticating.send_signal(signal.SIGHUP)
    authenticating.wait_log("generation 2 ready")
    assert status("carol:secret") == b"200"
    assert status("alice:wonderland") == b"200"


# Sends `count` requests with wrong passwords from argv[1] (8 threads, a new
# connection each); prints {"statuses": {...}, "started": t0, "ended": t1}.
ATTACK = r"""
import base64, collections, json, socket, sys, threading, time
proxy, source, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
statuses = collections.Counter()
lock = threading.Lock()
todo = iter(range(count))
def attack():
    while True:
        with lock:
            i = next(todo, None)
        if i is None:
            return
        token = base64.b64encode(f"alice:guess{i}".encode()).decode()
        s = socket.create_connection((proxy, 3128), timeout=30, source_address=(source, 0))
        s.sendall(f"GET http://203.0.113.2:8080/ip HTTP/1.1\r\nHost: 203.0.113.2:8080\r\n"
                  f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and (chunk := s.recv(4096)):
            data += chunk
        s.close()
        with lock:
            statuses[data.split(b" ", 2)[1].decode() if data else "none"] += 1
            if sum(statuses.values()) == 50:
                print("attacking", flush=True)
started = time.monotonic()
threads = [threading.Thread(target=attack) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"statuses": statuses, "started": started, "ended": time.monotonic()}))
"""

# Other users, from another address: each request needs a fresh bcrypt check
# (user{i}, never seen before) or a cached one; prints latencies in seconds.
VICTIM = r"""
import base64, json, socket, sys, time
proxy, source, prefix, users = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def request(user, password):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    started = time.monotonic()
    s = socket.create_connection((proxy, 3128), timeout=30, source_address=(source, 0))
    s.sendall(f"GET http://203.0.113.2:8080/ip HTTP/1.1\r\nHost: 203.0.113.2:8080\r\n"
              f"Proxy-Authorization: Basic {token}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return time.monotonic() - started, data.split(b" ", 2)[1].decode()
results = []
for i in range(users):
    results.append(request(f"{prefix}{i}", f"pw{i}"))  # a fresh check
    results.append(request(f"{prefix}{i}", f"pw{i}"))  # cached
print(json.dumps({"latencies": [r[0] for r in results], "statuses": [r[1] for r in results],
                  "started": None, "ended": time.monotonic()}))
"""

VICTIM_ADDRESS = "198.51.100.3"


@pytest.fixture
def second_client_address(lab: Lab):
    lab.run(lab.client, ["ip", "addr", "add", f"{VICTIM_ADDRESS}/24", "dev", Lab.CLIENT_IF])
    try:
        yield VICTIM_ADDRESS
    finally:
        lab.run(lab.client, ["ip", "addr", "del", f"{VICTIM_ADDRESS}/24", "dev", Lab.CLIENT_IF],
                check=False)  # fmt: skip


def test_a_thousand_wrong_passwords_do_not_slow_other_clients_down(
    proxy, lab, tmp_path, second_client_address
):
    users = 10
    path = tmp_path / "htpasswd"
    # Cost 8: each check takes tens of milliseconds, so queueing behind a
    # thousand guesses would show.
    lines = [htpasswd_line("alice", "wonderland", 8)]
    for prefix in ("base", "during"):
        lines += [htpasswd_line(f"{prefix}{i}", f"pw{i}", 8) for i in range(users)]
    path.write_text("".join(lines))
    proxy(AUTH.format(access_log=tmp_path / "access.log", htpasswd=path))

    def victim(prefix: str) -> dict:
        argv = [sys.executable, "-c", VICTIM, Lab.ROUTER_CLIENT4, second_client_address,
                prefix, str(users)]  # fmt: skip
        return json.loads(lab.run(lab.client, argv).stdout)

    before = victim("base")
    baseline = before["latencies"]
    attacker = lab.popen(
        lab.client,
        [sys.executable, "-c", ATTACK, Lab.ROUTER_CLIENT4, Lab.CLIENT4, "1000"],
        stdout=subprocess.PIPE,
    )
    try:
        assert attacker.stdout.readline().strip() == b"attacking"
        during = victim("during")
        report = json.loads(attacker.stdout.readline())
        attacker.wait(timeout=120)
    finally:
        if attacker.poll() is None:
            lab.stop_process(attacker)
    statuses = report["statuses"]
    latencies = during["latencies"]

    def ms(values) -> str:
        return f"{statistics.median(values) * 1000:.1f}/{max(values) * 1000:.1f}"

    # Even positions: a fresh bcrypt check; odd: the same credentials again, cached.
    base_fresh, fresh = baseline[::2], latencies[::2]
    figures = (
        f"latency median/max ms, fresh check | cached: baseline {ms(base_fresh)} |"
        f" {ms(baseline[1::2])}; during the attack {ms(fresh)} | {ms(latencies[1::2])};"
        f" attack: {statuses} in {report['ended'] - report['started']:.2f} s"
    )
    print("\n" + figures)
    assert before["statuses"] == during["statuses"] == ["200"] * (2 * users), figures
    assert sum(statuses.values()) == 1000
    # 10 guesses in a burst, then one more every 6 s: the rest are 429 without a check.
    allowed = 10 + int((report["ended"] - report["started"]) / 6) + 1
    assert statuses.get("407", 0) <= allowed and statuses.get("429", 0) >= 1000 - allowed, figures
    assert during["ended"] > report["started"]  # the victims ran during the attack
    # Generous (the machine is shared); what must not happen is a check that
    # waits behind the guesses queued in the bcrypt pool.
    assert statistics.median(fresh) < 3 * statistics.median(base_fresh) + 0.1, figures
    assert max(latencies) < 3.0, figures


# --- nginx with default settings, in the origin namespace -----------------------------------------

NGINX_PORT = 8090
NGINX_CONF = """
daemon off;
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    include /etc/nginx/mime.types;
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    gzip on;  # and gzip_proxied left at its default (off)
    gzip_types application/javascript text/javascript;
    server {{
        listen {port};
        listen [::]:{port};
        root {dir}/www;
        location = /challenge {{
            add_header Proxy-Authenticate 'Basic realm="upstream"' always;
            return 200 "challenged\\n";
        }}
    }}
}}
"""


@pytest.fixture
def nginx(lab: Lab, tmp_path):
    nginx_bin = "/usr/sbin/nginx"
    if not Path(nginx_bin).exists():
        pytest.fail("nginx is not installed (apt-get install nginx)")
    root = tmp_path / "nginx"
    (root / "www").mkdir(parents=True)
    # About 154 KB of script that compresses well, like the one in issue 11.
    script = "".join(
        f"function handler{i}(event) {{ return event.target.value + {i}; }}\n" for i in range(2600)
    )
    (root / "www" / "app.js").write_text(script)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=root, port=NGINX_PORT))
    log = open(root / "stdout.log", "wb")
    process = lab.popen(lab.origin, [nginx_bin, "-c", str(conf), "-p", str(root)],
                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        lab.wait_port(lab.origin, Lab.ORIGIN4, NGINX_PORT)
        yield NGINX_PORT
    finally:
        lab.stop_process(process)
        log.close()
