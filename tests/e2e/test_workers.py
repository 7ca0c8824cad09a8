"""
Pre-forked workers end to end: SO_REUSEPORT listeners, respawn, hitless
reload, draining stop, and least privilege, in the namespace lab.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tproxy_twist.lab import Lab
from tproxy_twist.lab.origin import expected_sha256

CONFIG = """
workers = 3
drain_timeout = 20

[metrics]
listen = "127.0.0.1:9464"

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["198.51.100.0/24"]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
"""


def listening_pids(lab: Lab, port: int) -> set[int]:
    out = lab.run(lab.router, ["ss", "-Hltnp", "sport", "=", f":{port}"]).stdout.decode()
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def three_listeners(lab: Lab) -> set[int] | None:
    pids = listening_pids(lab, 3129)  # one look: the set may change between two
    return pids if len(pids) == 3 else None


def replaced(lab: Lab, victim: int) -> set[int] | None:
    pids = three_listeners(lab)
    return pids if pids and victim not in pids else None


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"not within {timeout}s: {what() if callable(what) else what}")


def router_pids(lab: Lab) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", lab.router], capture_output=True).stdout
    return {int(p) for p in out.split()}


def test_three_workers_each_listen_on_the_tproxy_port_and_the_master_does_not(proxy, lab):
    running = proxy(CONFIG)
    pids = wait_for(lambda: three_listeners(lab),
                    60, "3 listeners")  # fmt: skip
    assert running.pid not in pids
    assert listening_pids(lab, 3128) == pids


def test_a_killed_worker_is_replaced_under_load(proxy, lab):
    # How fast is measured in bench/ (bench/process_life.py); here: that it happens.
    running = proxy(CONFIG)
    before = wait_for(lambda: three_listeners(lab),
                      60, "3 listeners")  # fmt: skip
    load = lab.popen(lab.client, ["python3", "-c", LOAD, Lab.ORIGIN4, "4"], stdout=subprocess.PIPE)
    time.sleep(1.0)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: replaced(lab, victim), 30, lambda: running.log_text()[-3000:])
    assert len(after - before) == 1
    ok, failed = json.loads(load.communicate(timeout=30)[0])
    assert ok > 100
    assert failed <= 4  # at most the requests in flight on the killed worker


# Four concurrent clients, each doing sequential requests on fresh connections
# for four seconds; prints [ok, failed].
LOAD = """
import http.client, sys, threading, time, json
host, n = sys.argv[1], int(sys.argv[2])
counts = [0, 0]
def run():
    end = time.monotonic() + 4
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(host, 80, timeout=30)
            c.request("GET", "/ip")
            ok = c.getresponse().status == 200
            c.close()
        except Exception:
            ok = False
        counts[0 if ok else 1] += 1
threads = [threading.Thread(target=run) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(counts))
"""


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_two_reloads_under_keep_alive_load_lose_no_request(proxy, lab):
    running = proxy(CONFIG)
    old = wait_for(lambda: three_listeners(lab),
                   60, "3 listeners")  # fmt: skip
    wrk = lab.popen(
        lab.client,
        ["wrk", "-t2", "-c20", "-d7s", f"http://{Lab.ORIGIN4}/ip"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.5)
    running.send_signal(signal.SIGHUP)
    time.sleep(2.5)
    running.send_signal(signal.SIGHUP)
    report = wrk.communicate(timeout=60)[0].decode()
    requests = int(re.search(r"(\d+) requests in", report).group(1))
    assert requests > 1000, report
    assert "Socket errors" not in report, report
    assert "Non-2xx" not in report, report
    running.wait_log("generation 3 ready", timeout=60)
    now = wait_for(lambda: three_listeners(lab), 60, "3 new")
    assert not now & old
    # Every old worker has exited, not just stopped listening.
    expected = {running.pid, *now}
    wait_for(
        lambda: router_pids(lab) == expected,
        25,
        lambda: (
            f"old workers gone (router has {router_pids(lab)}, expected {expected}):\n"
            f"{running.log_text()[-3000:]}"
        ),
    )
    assert running.log_text().count("exited normally") >= 3


def test_a_reload_with_a_broken_config_changes_nothing_and_names_the_key(proxy, lab, curl):
    running = proxy(CONFIG)
    before = wait_for(lambda: three_listeners(lab),
                      60, "3 listeners")  # fmt: skip
    running.config_path.write_text(CONFIG + "\nbogus_key = 1\n")
    running.send_signal(signal.SIGHUP)
    log = running.wait_log("reload refused")
    assert "bogus_key: unknown key" in log
    assert listening_pids(lab, 3129) == before
    assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip").stdout)["client"] == Lab.CLIENT4


def test_sigterm_lets_a_slow_download_finish_then_everything_exits(proxy, lab, tmp_path):
    running = proxy(CONFIG)
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"tproxy-twist-{running.pid}.*"))
    wait_for(lambda: len(listening_pids(lab, 3129)) == 3, 60, "3 listeners")
    n = 10 * 1024 * 1024
    out = tmp_path / "download"
    download = lab.popen(
        lab.client,
        ["curl", "-s", "-o", str(out), "--max-time", "60",
         f"http://{Lab.ORIGIN4}/bytes?n={n}&rate=3000000&seed=term"],
    )  # fmt: skip
    time.sleep(1.0)
    running.send_signal(signal.SIGTERM)
    wait_for(lambda: listening_pids(lab, 3129) == set(), 30, "listeners closed")  # no new ones
    assert download.wait(timeout=60) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_sha256(n, "term")
    # twistd re-raises the signal it stopped for, so the exit status says SIGTERM.
    assert running.popen.wait(timeout=30) in (0, -signal.SIGTERM)
    assert router_pids(lab) == set()
    # The master's runtime directory (config snapshots, metrics files) went with it.
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"tproxy-twist-{running.pid}.*")) == []


def test_workers_run_as_the_configured_user_with_one_capability_and_still_spoof(proxy, lab, curl):
    running = proxy('user = "nobody"\n' + CONFIG)
    pids = wait_for(lambda: three_listeners(lab),
                    60, "3 listeners")  # fmt: skip
    nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True).stdout.decode().strip()
    for pid in pids:
        status = open(f"/proc/{pid}/status").read()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        assert set(uids) == {nobody}
        assert re.search(r"^CapEff:\s+0000000000002000$", status, re.M), status  # CAP_NET_RAW
        assert re.search(r"^CapPrm:\s+0000000000002000$", status, re.M), status
    assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip").stdout)["client"] == Lab.CLIENT4
    assert "running as nobody" in running.log_text()


def test_twistd_uid_and_gid_apply_to_the_workers_and_the_master_keeps_root(lab, tmp_path, curl):
    config = tmp_path / "tproxy.toml"
    config.write_text(CONFIG.replace("workers = 3", "workers = 2"))
    master = lab.start_proxy(
        config,
        tmp_path / "twistd.log",
        twistd_args=("--uid", "nobody", "--gid", "nogroup"),
        pidfile=tmp_path / "pid",
    )
    try:
        pids = wait_for(
            lambda: len(listening_pids(lab, 3129)) == 2 and listening_pids(lab, 3129),
            60,
            lambda: (tmp_path / "twistd.log").read_text(),
        )
        nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True).stdout.strip()
        for pid in pids:
            uids = re.search(r"^Uid:\s+(.*)$", open(f"/proc/{pid}/status").read(), re.M)
            assert set(uids.group(1).split()) == {nobody.decode()}
        master_uids = re.search(r"^Uid:\s+(.*)$", open(f"/proc/{master.pid}/status").read(), re.M)
        assert set(master_uids.group(1).split()) == {"0"}
        assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip").stdout)["client"] == Lab.CLIENT4
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(master.pid, signal.SIGKILL)


def test_a_proxy_port_taken_at_start_makes_the_master_exit_non_zero_with_one_line(proxy, lab):
    # Something else holds the forward port (without SO_REUSEPORT): workers cannot bind it.
    squatter = lab.popen(
        lab.router,
        ["python3", "-c", "import socket, time; s = socket.socket(); "
         # SO_REUSEADDR: earlier tests' connections to 3128 may be in TIME_WAIT.
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
         "s.bind(('0.0.0.0', 3128)); s.listen(); time.sleep(60)"],
    )  # fmt: skip
    try:
        lab.wait_port(lab.router, "127.0.0.1", 3128)
        running = proxy(CONFIG.replace("workers = 3", "workers = 2"), wait=False)
        assert running.popen.wait(timeout=60) == 1
        log = running.log_text()
        [line] = [
            line for line in log.splitlines() if "cannot start:" in line and "critical" in line
        ]
        assert "every worker of generation 1 failed to start" in line
        assert "cannot listen on 0.0.0.0:3128" in line and "Address already in use" in line
        assert router_pids(lab) == {squatter.pid}  # no worker left behind
    finally:
        squatter.kill()


def test_a_metrics_address_taken_at_start_leaves_no_worker_and_says_so_in_one_line(proxy, lab):
    squatter = lab.popen(
        lab.router,
        ["python3", "-c", "import socket, time; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
         "s.bind(('127.0.0.1', 9464)); s.listen(); time.sleep(60)"],
    )  # fmt: skip
    try:
        lab.wait_port(lab.router, "127.0.0.1", 9464)
        running = proxy(CONFIG, wait=False)
        assert running.popen.wait(timeout=60) == 1
        log = running.log_text()
        assert "tproxy-twist: cannot listen for metrics on 127.0.0.1:9464" in log
        assert "Traceback" not in log
        assert "worker 1 started" not in log
        assert router_pids(lab) == {squatter.pid}
    finally:
        squatter.kill()


def metrics_text(lab: Lab, path: str = "/metrics") -> tuple[int, str]:
    out = lab.run(
        lab.router,
        ["curl", "-s", "-w", "\n%{http_code}", "--max-time", "10", f"http://127.0.0.1:9464{path}"],
        check=False,
    ).stdout.decode()
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def test_a_stopped_worker_is_shown_not_ready_then_killed_and_replaced_and_no_request_waits(
    proxy, lab
):
    running = proxy("heartbeat_grace = 6\n" + CONFIG)
    before = wait_for(lambda: three_listeners(lab), 60, "3 listeners")
    wait_for(lambda: metrics_text(lab, "/healthz")[0] == 200, 30, "healthz 200")
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        code, text = wait_for(
            lambda: (r := metrics_text(lab, "/healthz"))[0] == 503 and r,
            15,
            lambda: running.log_text()[-3000:],
        )
        assert f"(pid {victim}): no heartbeat" in text
        assert "tproxy_workers_not_ready 1.0" in metrics_text(lab)[1]
        # Requests made while it is stopped are answered: after the grace it is
        # killed and its queued connections move to the other workers.
        load = lab.popen(
            lab.client, ["python3", "-c", LOAD, Lab.ORIGIN4, "4"], stdout=subprocess.PIPE
        )
        after = wait_for(lambda: replaced(lab, victim), 60, lambda: running.log_text()[-3000:])
        ok, failed = json.loads(load.communicate(timeout=120)[0])
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert len(after - before) == 1
    assert ok > 0 and failed == 0, running.log_text()[-3000:]
    log = running.log_text()
    assert f"(pid {victim}) silent for" in log and "killing it" in log
    wait_for(lambda: metrics_text(lab, "/healthz")[0] == 200, 30, "healthz 200 again")


def test_ten_reloads_in_five_seconds_under_connection_close_load_lose_no_request(proxy, lab):
    running = proxy(CONFIG)
    wait_for(lambda: three_listeners(lab), 60, "3 listeners")
    load = lab.popen(
        lab.client, ["python3", "-c", LOAD.replace("+ 4", "+ 8"), Lab.ORIGIN4, "4"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)
    for _ in range(10):
        running.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    ok, failed = json.loads(load.communicate(timeout=120)[0])
    assert ok > 100 and failed == 0, running.log_text()[-5000:]
    # The reloads coalesced; the log names the generation that ends up serving.
    log = running.wait_log("ready and serving", timeout=60)
    serving = wait_for(
        lambda: re.findall(r"generation (\d+) ready and serving", running.log_text()),
        60,
        "a generation serving",
    )
    assert 2 <= int(serving[-1]) <= 11
    assert "reload failed" not in log


def test_a_master_killed_outright_leaves_no_worker_behind(proxy, lab):
    running = proxy(CONFIG)
    workers = wait_for(lambda: three_listeners(lab), 60, "3 listeners")
    os.kill(running.pid, signal.SIGKILL)
    running.popen.wait(timeout=10)
    wait_for(
        lambda: not router_pids(lab) & workers,
        30,
        lambda: f"workers still running: {router_pids(lab) & workers}",
    )
