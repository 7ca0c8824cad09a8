"""
The status page with real traffic through the lab: /status.json agrees with
/metrics and with the requests sent, the recent problems name client,
destination and reason and nothing secret, headless Chromium draws /status
with every port and worker, `tproxy-twist status` prints the same, and
status_allow keeps other clients out.

Set TPROXY_STATUS_SCREENSHOT=path to keep the browser's screenshot (that is
how docs/status.png was made).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab

BASE = "http://127.0.0.1:9464"  # the metrics listener, in the router namespace
ORIGIN = f"http://{Lab.ORIGIN4}"  # port 80: diverted to the tproxy port
FORWARD_PROXY = f"http://{Lab.ROUTER_CLIENT4}:3128"
SECRET = "hunter2"  # in a query string: must never reach the status page

CONFIG = """
workers = 2

[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 3
response = 5

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["198.51.100.0/24"]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"

# Nothing is diverted to it here: its TLS counters show, at 0.
[[port]]
name = "tls"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
"""


def get(lab: Lab, path: str) -> tuple[int, str]:
    """GET BASE+path in the router namespace: (status, body)."""
    proc = lab.run(lab.router, ["curl", "-s", "--noproxy", "*", "-w", "\n%{http_code}",
                                BASE + path])  # fmt: skip
    body, _, code = proc.stdout.decode().rpartition("\n")
    return int(code), body


def status(lab: Lab) -> dict:
    code, body = get(lab, "/status.json")
    assert code == 200, body
    return json.loads(body)


def metric_sums(lab: Lab) -> dict[tuple[str, str], float]:
    """(metric name, port) -> the sum over its other labels, from /metrics."""
    code, body = get(lab, "/metrics")
    assert code == 200
    sums: dict[tuple[str, str], float] = {}
    for line in body.splitlines():
        if line.startswith("#") or 'port="' not in line:
            continue
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        port = series.split('port="', 1)[1].split('"', 1)[0]
        sums[(name, port)] = sums.get((name, port), 0.0) + float(value)
    return sums


def fetch(curl, urls: list[str], *args: str) -> list[str]:
    """GET every URL in one curl run, a new connection each; return the status codes."""
    argv = ["-H", "Connection: close", "-w", "%{http_code}\\n", *args]
    for url in urls:
        argv += [url, "-o", "/dev/null"]
    return curl(*argv, timeout=120).stdout.decode().split()


def wait_for(condition, what: str, timeout: float = 30, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def worker_pids(master: int) -> set[int]:
    """The pids of the master's worker processes (from /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == master and b"tproxy_twist.worker" in cmdline:
            pids.add(int(entry.name))
    return pids


def send_traffic(curl) -> dict[str, Counter]:
    """Successes, origin errors, upstream errors and rejections; the codes per port."""
    transparent = fetch(curl, [f"{ORIGIN}/ip"] * 12 + [f"{ORIGIN}/status/503"] * 3
                        + [f"{ORIGIN}/status/404"] * 2)  # fmt: skip
    # Nobody listens on 81: 502 and upstream_errors{reason="refused"}.
    forward = fetch(curl, [f"{ORIGIN}:8080/ip"] * 5 + [f"{ORIGIN}:81/private?token={SECRET}"] * 2,
                    "-x", FORWARD_PROXY)  # fmt: skip
    # CONNECT to port 22 (only 443 is allowed): 403, rejected{reason="forbidden"}.
    connect = curl("-p", "-x", FORWARD_PROXY, "-o", "/dev/null", "-w", "%{http_connect}",
                   f"http://{Lab.ORIGIN4}:22/").stdout.decode()  # fmt: skip
    return {
        "transparent": Counter(transparent),
        "forward": Counter(forward) + Counter([connect]),
    }


@pytest.fixture
def busy_proxy(proxy, lab, curl):
    process = proxy(CONFIG)
    sent = send_traffic(curl)
    assert sent == {
        "transparent": {"200": 12, "503": 3, "404": 2},
        "forward": {"200": 5, "502": 2, "403": 1},
    }
    expected = {"transparent": 17, "forward": 8}

    def settled():
        doc = status(lab)
        counts = {p["name"]: p["requests_total"] for p in doc["ports"]}
        problems = len(doc["problems"])
        if all(counts.get(k, 0) >= n for k, n in expected.items()) and problems >= 3:
            return doc
        return None

    wait_for(settled, "the status page to count every request and problem")
    return process


def test_status_json_agrees_with_metrics_and_with_the_requests_sent(busy_proxy, lab):
    time.sleep(1.5)  # one more sample: nothing more may arrive
    before = metric_sums(lab)
    doc = status(lab)
    after = metric_sums(lab)
    assert before == after, "traffic still moving; the comparison would be unfair"
    ports = {p["name"]: p for p in doc["ports"]}
    assert list(ports) == ["forward", "transparent", "tls"]

    t, f, tls = ports["transparent"], ports["forward"], ports["tls"]
    assert (t["mode"], t["listen"], t["protocol"]) == ("tproxy", "[::]:3129", "http")
    assert t["requests_total"] == 17
    assert t["responses"] == {"1xx": 0, "2xx": 12, "3xx": 0, "4xx": 2, "5xx": 3, "none": 0}
    assert f["requests_total"] == 8
    assert f["responses"]["2xx"] == 5 and f["responses"]["5xx"] == 2
    assert f["responses"]["4xx"] == 1
    assert f["upstream_errors"]["refused"] == 2
    assert f["rejected"]["forbidden"] == 1
    assert tls["protocol"] == "tls" and tls["tls"] is not None
    assert t["requests_per_second"]["1m"] > 0
    assert len(t["history"]["requests_per_second"]) >= 1

    # The same numbers as /metrics.
    for name, port in ports.items():
        assert port["requests_total"] == after.get(("tproxy_requests_total", name), 0)
        assert (
            port["bytes_total"]["in"]
            == after.get(("tproxy_bytes_total", name), 0) - port["bytes_total"]["out"]
        )
        assert port["connections_total"] == after.get(("tproxy_connections_total", name), 0)
        assert sum(port["upstream_errors"].values()) == after.get(
            ("tproxy_upstream_errors_total", name), 0
        )
        assert sum(port["rejected"].values()) == after.get(("tproxy_rejected_total", name), 0)
        if port["tls"] is not None:
            assert sum(port["tls"]["actions"].values()) == after.get(
                ("tproxy_tls_connections_total", name), 0
            )
    assert f["bytes_total"]["out"] > 0 and t["bytes_total"]["out"] > 0

    # Workers: the master's real children.
    pids = {w["pid"] for w in doc["workers"]}
    assert pids == worker_pids(busy_proxy.pid)
    assert len(pids) == 2
    assert all(w["state"] == "ready" and w["rss_bytes"] > 1_000_000 for w in doc["workers"])
    assert all(w["generation"] == 1 and w["restarts"] == 0 for w in doc["workers"])
    assert doc["master"]["workers_ready"] == 2 and doc["master"]["generation"] == 1
    assert doc["master"]["config"] == str(busy_proxy.config_path)
    probes = {p["name"]: p["ok"] for p in doc["master"]["probes"]}
    assert probes["IPv4 transparent bind"] and probes["IPv6 transparent bind"]
    assert "open files" in probes  # ok or not depends on this machine's RLIMIT_NOFILE

    # Recent problems: who, where, why; never the query.
    problems = [(p["port"], p["kind"], p["reason"], p["client"], p["destination"], p["status"])
                for p in doc["problems"]]  # fmt: skip
    refused = ("forward", "upstream_error", "refused", Lab.CLIENT4, f"{Lab.ORIGIN4}:81", 502)
    assert problems.count(refused) == 2, problems
    forbidden = ("forward", "rejected", "forbidden", Lab.CLIENT4, f"{Lab.ORIGIN4}:22", 403)
    assert forbidden in problems, problems
    assert {p["worker"] for p in doc["problems"]} <= {1, 2}
    _, page = get(lab, "/status")
    for text in (json.dumps(doc), page):
        assert SECRET not in text and "/private" not in text


def test_headless_chromium_draws_every_port_and_worker(busy_proxy, lab, curl, tmp_path):
    if shutil.which("chromium") is None:
        pytest.fail("needs chromium (apt install chromium)")
    doc = status(lab)
    home = tmp_path / "chromium"
    common = [
        "env", f"HOME={home}", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={home / 'profile'}", "--no-proxy-server",
    ]  # fmt: skip
    dom = lab.run(lab.router, [*common, "--dump-dom", f"{BASE}/status"], timeout=180)
    html = dom.stdout.decode()
    assert "<title>tproxy-twist status</title>" in html, dom.stderr.decode(errors="replace")[-2000:]
    for port in doc["ports"]:
        assert f'data-port="{port["name"]}"' in html
        assert port["listen"] in html
    for worker in doc["workers"]:
        assert f'data-worker="{worker["index"]}"' in html
        assert f"<td>{worker['pid']}</td>" in html
    assert html.count("<svg") >= 2 * len(doc["ports"])  # the sparklines
    assert "refused" in html and Lab.CLIENT4 in html  # the recent problems

    keep = os.environ.get("TPROXY_STATUS_SCREENSHOT")
    if keep:  # for the README's picture: some minutes of history in the sparklines
        for _ in range(40):
            send_traffic(curl)
            time.sleep(1)
    shot = tmp_path / "status.png"
    lab.run(lab.router, [*common, "--hide-scrollbars", "--window-size=1700,1000",
                         f"--screenshot={shot}", f"{BASE}/status"], timeout=180)  # fmt: skip
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if keep:
        shutil.copyfile(shot, keep)


def test_tproxy_twist_status_prints_every_port_and_worker(busy_proxy, lab):
    doc = status(lab)
    proc = lab.run(lab.router, [sys.executable, "-m", "tproxy_twist.cli", "status",
                                "--config", str(busy_proxy.config_path)])  # fmt: skip
    text = proc.stdout.decode()
    for port in doc["ports"]:
        assert any(line.startswith(port["name"] + " ") for line in text.splitlines()), text
    for worker in doc["workers"]:
        assert f" {worker['pid']} " in text, text
    assert "refused" in text and SECRET not in text


STATUS_ALLOW = CONFIG.replace(
    'listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:9464"\nstatus_allow = ["192.0.2.0/24"]'
)


def test_status_allow_keeps_other_clients_out_and_metrics_stays(proxy, lab):
    proxy(STATUS_ALLOW)
    for path in ("/status", "/status.json"):
        code, body = get(lab, path)
        assert code == 403 and "status_allow" in body
    code, _ = get(lab, "/metrics")
    assert code == 200
    proc = lab.run(lab.router, [sys.executable, "-m", "tproxy_twist.cli", "status", "--url",
                                "127.0.0.1:9464"], check=False)  # fmt: skip
    assert proc.returncode == 1 and b"HTTP 403" in proc.stdout


def test_a_replaced_worker_and_a_reload_show_on_the_status_page(proxy, lab):
    import signal

    process = proxy(CONFIG)
    doc = wait_for(lambda: (d := status(lab))["master"]["workers_ready"] == 2 and d, "2 ready")
    assert doc["master"]["last_reload"] is None
    victim = next(w for w in doc["workers"] if w["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        d = status(lab)
        slot = [w for w in d["workers"] if w["index"] == 1]
        ok = slot and slot[0]["pid"] != victim["pid"] and slot[0]["state"] == "ready"
        return ok and slot[0]["restarts"] == 1 and d

    doc = wait_for(replaced, "worker 1 replaced, with one restart", timeout=60)
    assert next(w for w in doc["workers"] if w["index"] == 2)["restarts"] == 0

    process.config_path.write_text(CONFIG.replace("[timeouts]", "[timeouts]\nidle = 301"))
    process.send_signal(signal.SIGHUP)

    def reloaded():
        d = status(lab)
        reload = d["master"]["last_reload"]
        serving = [w for w in d["workers"] if w["generation"] == 2 and w["state"] == "ready"]
        return reload and reload["result"] == "ok" and len(serving) == 2 and d

    doc = wait_for(reloaded, "generation 2 serving", timeout=90)
    assert (
        doc["master"]["generation"] == 2
        and "generation 2" in doc["master"]["last_reload"]["detail"]
    )

    process.config_path.write_text(CONFIG + "\nnonsense = 1\n")
    process.send_signal(signal.SIGHUP)
    doc = wait_for(lambda: (d := status(lab))["master"]["last_reload"]["result"] == "refused" and d,
                   "the bad reload refused")  # fmt: skip
    assert "nonsense" in doc["master"]["last_reload"]["detail"]
    assert doc["master"]["generation"] == 2
