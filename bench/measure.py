"""The measurements, each run from the client namespace against one path.

- :func:`wrk` — requests/s (keep-alive or a new connection per request), and
  latency percentiles at a fixed moderate rate (wrk's Lua ``delay()``).
- :func:`download` — MB/s of one 100 MB response, with curl.
- :func:`idle_memory` — RSS of the proxy's workers holding N idle keep-alive
  connections (bench/idle_clients.py opens them).
"""

from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .contenders import Contender
from .lab import BIG_PATH, BIG_SIZE, BenchLab

__all__ = ["download", "fetch_headers", "idle_memory", "rss_kib", "wrk"]

HERE = Path(__file__).resolve().parent

# wrk prints its summary as one JSON line (latencies in microseconds).
_REPORT_LUA = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, '
    .. '"mean_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""

# Each connection waits this long after every response before its next request:
# with LATENCY_CONNECTIONS connections that is a steady ~1,000 requests/s.
LATENCY_CONNECTIONS = 8
LATENCY_DELAY_MS = 8


def _write_scripts(workdir: Path) -> tuple[Path, Path]:
    report = workdir / "report.lua"
    report.write_text(_REPORT_LUA)
    paced = workdir / "paced.lua"
    paced.write_text(f"function delay()\n  return {LATENCY_DELAY_MS}\nend\n" + _REPORT_LUA)
    return report, paced


def wrk(
    lab: BenchLab,
    url: str,
    *,
    seconds: float,
    threads: int = 2,
    connections: int = 64,
    close: bool = False,
    paced: bool = False,
) -> dict:
    """Run wrk in the client namespace; return its summary (see _REPORT_LUA) plus req/s."""
    assert lab.tmpdir is not None
    report, paced_script = _write_scripts(lab.tmpdir)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(paced_script if paced else report),
    ]
    if close:
        argv += ["-H", "Connection: close"]
    proc = lab.run(lab.client, [*argv, url], check=False, timeout=seconds + 60)
    out = proc.stdout.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON ") :])
            break
    else:
        raise RuntimeError(
            f"wrk printed no summary (status {proc.returncode}):\n{out}\n"
            + proc.stderr.decode(errors="replace")
        )
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(
        result[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    result["argv"] = " ".join(argv + [url])
    return result


def fetch_headers(lab: BenchLab, url: str) -> tuple[int, dict[str, list[str]], bytes]:
    """One GET from the client namespace: (status, headers by lower-case name, body)."""
    assert lab.tmpdir is not None
    head_file = lab.tmpdir / "headers.txt"
    proc = lab.run(
        lab.client,
        ["curl", "-sS", "--max-time", "10", "-D", str(head_file), url],
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url}: {proc.stderr.decode(errors='replace').strip()}")
    lines = head_file.read_text(errors="replace").splitlines()
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, proc.stdout


def download(lab: BenchLab, base_url: str, repetitions: int) -> dict:
    """Download the 100 MB file ``repetitions`` times with curl; median and best MB/s."""
    speeds = []
    for _ in range(repetitions):
        proc = lab.run(
            lab.client,
            [
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{time_total}",
                base_url + BIG_PATH,
            ],
            check=False,
            timeout=150,
        )
        code, size, seconds = proc.stdout.decode().split()
        if proc.returncode != 0 or code != "200" or int(size) != BIG_SIZE:
            raise RuntimeError(
                f"100 MB download: status {code}, {size} of {BIG_SIZE} bytes, curl exit "
                f"{proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
            )
        speeds.append(BIG_SIZE / float(seconds) / 1e6)
    return {"median_mb_s": statistics.median(speeds), "best_mb_s": max(speeds), "all": speeds}


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of a process, in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _memory(lab: BenchLab, contender: Contender) -> dict:
    workers = contender.worker_pids(lab)
    every = contender.all_pids(lab)
    per_pid = {pid: rss_kib(pid) for pid in every}
    for pid in workers:
        per_pid.setdefault(pid, rss_kib(pid))
    worker_rss = sum(per_pid[p][0] for p in workers)
    return {
        "worker_pids": workers,
        "worker_rss_kib": worker_rss,
        "worker_pss_kib": sum(per_pid[p][1] for p in workers),
        "total_rss_kib": sum(rss for rss, _ in per_pid.values()),
        "per_worker_mb": worker_rss / contender.workers / 1024,
    }


def idle_memory(
    lab: BenchLab, contender: Contender, url_host: str, count: int, target: int
) -> dict:
    """RSS of the proxy's workers before, and while holding ``count`` idle connections.

    Each connection has had one request answered. The held connections are
    counted on the router side too (established sockets whose local port is
    80: a diverted connection's local address is its original destination). When
    ``count`` is below ``target`` (a proxy that cannot hold that many under the
    open-file limit), ``per_worker_mb`` is scaled linearly to ``target``
    connections: before + (during - before) * target / count.
    """
    before = _memory(lab, contender)
    script = HERE / "idle_clients.py"
    hold = 180
    proc = lab.popen(
        lab.client,
        [sys.executable, str(script), url_host, "80", "/small", str(count), str(hold)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 150)
        line = proc.stdout.readline() if ready else b""
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise RuntimeError(
                f"idle_clients.py reported nothing: {err.decode(errors='replace')[-2000:]}"
            )
        opened = json.loads(line)
        time.sleep(1.0)  # let the workers settle (lazy frees, buffered metrics)
        # Diverted connections keep the original destination as their local address.
        held_by_proxy = lab.established(lab.router, 80)
        during = _memory(lab, contender)
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        lab.stop_process(proc, grace=1)
    per_worker_mb = during["per_worker_mb"]
    if count < target and count > 0:
        grown = during["per_worker_mb"] - before["per_worker_mb"]
        per_worker_mb = before["per_worker_mb"] + grown * target / count
    return {
        "connections": count,
        "target": target,
        "opened": opened,
        "established_on_proxy": held_by_proxy,
        "before": before,
        "during": during,
        "per_worker_mb": per_worker_mb,
        "scaled": count < target,
    }
