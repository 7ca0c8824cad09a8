"""The four paths the benchmark measures, each with its start, proof of use and stop.

- ``direct``: client → origin port 8080, routed by the router, no proxy, no rules.
- ``haproxy``: HAProxy with ``bind :3129 transparent``, ``source 0.0.0.0 usesrc
  clientip`` and ``server clear 0.0.0.0:0`` (connect to the original destination),
  ``nbthread 2``.
- ``squid``: ``http_port 3129 tproxy``, ``workers 2``, no caching.
- ``tproxy-twist``: ``twistd -n --pidfile= tproxy``, ``workers = 2``, metrics on.

Every proxy runs in the router namespace as root, with its configuration, logs
and pid files in the lab's temporary directory. Port 80 is diverted to :3129
only while a proxy is listening there (see :meth:`BenchLab.divert_to_proxy`).
"""

from __future__ import annotations

import csv
import io
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tproxy_twist.lab.topology import REPO_ROOT, child_env

from .lab import TPROXY_PORT, BenchLab

__all__ = [
    "CONTENDERS",
    "DEFAULT_CONTENDERS",
    "Contender",
    "Direct",
    "HAProxy",
    "Squid",
    "TproxyTwist",
    "TproxyTwistNoMetrics",
]

WORKERS = 2  # Squid's workers, HAProxy's threads, tproxy-twist's workers


def fd_limit() -> int:
    """The open-file limit every proxy inherits (bench.py raises it as far as allowed)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _header(headers: dict[str, list[str]], name: str) -> str:
    return ", ".join(headers.get(name.lower(), []))


def _router_pids(lab: BenchLab) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", lab.router], capture_output=True, timeout=20, check=False
    )
    return [int(tok) for tok in proc.stdout.decode().split() if tok.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Contender:
    """One path through the router. Subclasses fill in the proxy-specific parts."""

    name = ""
    diverted = True  # reached on port 80 through TPROXY; False: port 8080, routed
    workers = WORKERS
    binaries: tuple[str, ...] = ()  # programs it needs on PATH

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.log: Path | None = None

    # -- life cycle ---------------------------------------------------------

    def start(self, lab: BenchLab) -> None:
        """Start the proxy in the router namespace; return once it listens on :3129."""
        assert lab.tmpdir is not None
        self.dir = lab.tmpdir / self.name
        started = 1
        while self.dir.exists():  # started before in this lab (bench.tls --rounds)
            started += 1
            self.dir = lab.tmpdir / f"{self.name}-{started}"
        self.dir.mkdir(mode=0o755)
        self.log = self.dir / "output.log"
        argv = self.prepare(lab, self.dir)
        with open(self.log, "ab") as out:
            self.proc = lab.popen(
                lab.router,
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=child_env(),
            )
        lab.wait_listening(lab.router, TPROXY_PORT, self.proc, self.log)
        self.wait_ready(lab)

    def prepare(self, lab: BenchLab, workdir: Path) -> list[str]:
        """Write the configuration into ``workdir``; return the command line."""
        raise NotImplementedError

    def wait_ready(self, lab: BenchLab) -> None:
        """Return once the proxy serves (after its listener exists)."""

    def stop(self, lab: BenchLab) -> None:
        """Stop the proxy and every process it left in the router namespace."""
        if self.proc is not None:
            lab.stop_process(self.proc, grace=5)
        leftovers = _router_pids(lab)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _router_pids(lab) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- proof that traffic went through it -----------------------------------

    def check_response(self, headers: dict[str, list[str]]) -> str | None:
        """Why this response did NOT come through the proxy, or None if it did."""
        raise NotImplementedError

    def relayed_requests(self, lab: BenchLab) -> int | None:
        """The proxy's own count of requests relayed so far (None: it keeps none)."""
        return None

    # -- memory ---------------------------------------------------------------

    def max_idle(self) -> int | None:
        """How many idle client connections it can hold under :func:`fd_limit` (None: enough)."""
        return None

    def worker_pids(self, lab: BenchLab) -> list[int]:
        """The processes that serve traffic (their RSS is divided by :attr:`workers`)."""
        return [self.proc.pid] if self.proc is not None else []

    def all_pids(self, lab: BenchLab) -> list[int]:
        """Every process of the proxy (master, coordinator, workers)."""
        return _router_pids(lab)

    def version(self) -> str:
        return ""


class Direct(Contender):
    name = "direct"
    diverted = False

    def start(self, lab: BenchLab) -> None:
        pass

    def stop(self, lab: BenchLab) -> None:
        pass

    def check_response(self, headers: dict[str, list[str]]) -> str | None:
        via = _header(headers, "via")
        if via or _header(headers, "x-bench-proxy"):
            return f"the direct path went through a proxy (Via: {via!r})"
        return None

    def worker_pids(self, lab: BenchLab) -> list[int]:
        return []


class HAProxy(Contender):
    name = "haproxy"
    binaries = ("haproxy",)

    def max_idle(self) -> int | None:
        # One process holds every connection, two descriptors each (client and
        # server side); HAProxy refuses to start if maxconn needs more than the limit.
        return (fd_limit() - 200) // 2

    def prepare(self, lab: BenchLab, workdir: Path) -> list[str]:
        maxconn = self.max_idle()
        self.stats = workdir / "stats.sock"
        conf = workdir / "haproxy.cfg"
        conf.write_text(
            f"""\
# generated by bench/contenders.py: HAProxy full transparency (TPROXY).
global
    nbthread {WORKERS}
    maxconn {maxconn}
    stats socket {self.stats} mode 600 level admin

defaults
    mode http
    maxconn {maxconn}
    timeout connect 10s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s
    timeout http-request 30s

frontend tproxy
    bind 0.0.0.0:{TPROXY_PORT} transparent
    # The proof, in every response, that it came through HAProxy.
    http-response set-header X-Bench-Proxy haproxy
    default_backend original_destination

backend original_destination
    # Connect from the client's address to the connection's original destination.
    source 0.0.0.0 usesrc clientip
    # Each client connection keeps its own server connection (carrying that
    # client's address), as Squid and tproxy-twist do. (HAProxy 2.6's default,
    # "safe", puts them in a shared idle pool when the client leaves; with
    # usesrc clientip the next clients then open a server connection per request.)
    http-reuse never
    server clear 0.0.0.0:0
"""
        )
        return ["haproxy", "-db", "-f", str(conf)]

    def check_response(self, headers: dict[str, list[str]]) -> str | None:
        if _header(headers, "x-bench-proxy") != "haproxy":
            return "the response has no X-Bench-Proxy: haproxy header"
        return None

    def relayed_requests(self, lab: BenchLab) -> int | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        text = data.decode(errors="replace").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == "tproxy" and row.get("svname") == "FRONTEND":
                return int(row.get("req_tot") or 0)
        raise RuntimeError(f"no FRONTEND row in HAProxy's stats:\n{text[:2000]}")

    def worker_pids(self, lab: BenchLab) -> list[int]:
        # One process; its threads are the workers.
        return [self.proc.pid] if self.proc is not None else []

    def version(self) -> str:
        return _first_line(["haproxy", "-v"])


class Squid(Contender):
    name = "squid"
    binaries = ("squid",)
    MANAGER_PORT = 3130  # cache manager, on the router's loopback only

    def prepare(self, lab: BenchLab, workdir: Path) -> list[str]:
        # The workers drop to the proxy user; their logs and IPC live here.
        shutil.chown(workdir, "proxy", "proxy")
        # Squid's SMP IPC sockets live in its compiled-in state directory; the
        # service name keeps ours apart from any other Squid's (and in /dev/shm).
        run_dir = Path("/run/squid")
        if not run_dir.exists():
            run_dir.mkdir(mode=0o755)
            shutil.chown(run_dir, "proxy", "proxy")
        self.service = "bench" + secrets.token_hex(3)
        conf = workdir / "squid.conf"
        conf.write_text(
            f"""\
# generated by bench/contenders.py: Squid TPROXY interception, SMP, no caching.
workers {WORKERS}
http_port {TPROXY_PORT} tproxy
http_port 127.0.0.1:{self.MANAGER_PORT}
http_access allow localhost manager
http_access deny manager
http_access allow all
cache deny all
cache_mem 0 MB
memory_cache_shared off
access_log none
cache_store_log none
logfile_rotate 0
cache_log {workdir}/cache.log
pid_filename {workdir}/squid.pid
coredump_dir {workdir}
max_filedescriptors {fd_limit()}
cache_effective_user proxy
visible_hostname bench-squid
shutdown_lifetime 1 seconds
pinger_enable off
# Nothing to resolve (Host headers are IP literals); never query the host's resolver.
dns_nameservers 127.0.0.1
client_idle_pconn_timeout 10 minutes
"""
        )
        return ["squid", "--foreground", "-n", self.service, "-f", str(conf)]

    def wait_ready(self, lab: BenchLab) -> None:
        assert self.proc is not None and self.dir is not None
        lab.wait_listening(lab.router, self.MANAGER_PORT, self.proc, self.dir / "cache.log")

    def stop(self, lab: BenchLab) -> None:
        super().stop(lab)
        for shm in Path("/dev/shm").glob(f"{getattr(self, 'service', 'none')}-*"):
            shm.unlink(missing_ok=True)
        for ipc in Path("/run/squid").glob(f"{getattr(self, 'service', 'none')}-*"):
            ipc.unlink(missing_ok=True)

    def check_response(self, headers: dict[str, list[str]]) -> str | None:
        via = _header(headers, "via")
        if "squid" not in via.lower():
            return f"the response has no Via entry of Squid's (Via: {via!r})"
        return None

    def relayed_requests(self, lab: BenchLab) -> int | None:
        proc = lab.run(
            lab.router,
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                f"http://127.0.0.1:{self.MANAGER_PORT}/squid-internal-mgr/counters",
            ],
            check=False,
            timeout=30,
        )
        m = re.search(rb"^client_http\.requests = (\d+)", proc.stdout, re.M)
        if not m:
            raise RuntimeError(
                "Squid's cache manager gave no client_http.requests: "
                + (proc.stdout + proc.stderr).decode(errors="replace")[:2000]
            )
        return int(m.group(1))

    def worker_pids(self, lab: BenchLab) -> list[int]:
        # Kids are named "(squid-1) …", "(squid-2) …"; "(squid-coord-3)" is the coordinator.
        return [pid for pid in _router_pids(lab) if re.match(r"\(squid-\d+\)", _cmdline(pid))]

    def version(self) -> str:
        return _first_line(["squid", "-v"])


class TproxyTwist(Contender):
    name = "tproxy-twist"
    METRICS = "127.0.0.1:9464"

    def start(self, lab: BenchLab) -> None:
        assert lab.tmpdir is not None
        self.dir = lab.tmpdir / self.name
        started = 1
        while self.dir.exists():  # started before in this lab (bench.tls --rounds)
            started += 1
            self.dir = lab.tmpdir / f"{self.name}-{started}"
        self.dir.mkdir(mode=0o755)
        self.log = self.dir / "output.log"
        conf = self.dir / "tproxy.toml"
        conf.write_text(
            f"""\
# generated by bench/contenders.py
workers = {WORKERS}

[metrics]
listen = "{self.METRICS}"

[[port]]
name = "transparent"
listen = "0.0.0.0:{TPROXY_PORT}"
mode = "tproxy"
"""
        )
        self.proc = lab.start_proxy(conf, self.log, ports=[TPROXY_PORT])
        self.wait_ready(lab)

    def wait_ready(self, lab: BenchLab) -> None:
        # /healthz answers 200 once every worker is ready.
        deadline = time.monotonic() + 30
        while True:
            proc = lab.run(
                lab.router,
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    f"http://{self.METRICS}/healthz",
                ],
                check=False,
                timeout=15,
            )
            if proc.stdout.strip() == b"200":
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tproxy-twist exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("tproxy-twist's /healthz did not answer 200 within 30s")
            time.sleep(0.1)

    def check_response(self, headers: dict[str, list[str]]) -> str | None:
        via = _header(headers, "via")
        if "(tproxy-twist)" not in via:
            return f"the response has no Via entry of tproxy-twist's (Via: {via!r})"
        return None

    def relayed_requests(self, lab: BenchLab) -> int | None:
        proc = lab.run(
            lab.router,
            ["curl", "-sS", "--max-time", "20", f"http://{self.METRICS}/metrics"],
            check=False,
            timeout=30,
        )
        total = 0.0
        for line in proc.stdout.decode(errors="replace").splitlines():
            if line.startswith("tproxy_requests_total{") and 'port="transparent"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def worker_pids(self, lab: BenchLab) -> list[int]:
        return [pid for pid in _router_pids(lab) if "tproxy_twist.worker" in _cmdline(pid)]

    def version(self) -> str:
        try:
            head = (
                subprocess.run(
                    ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                .stdout.decode()
                .strip()
            )
            dirty = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "tproxy-twist (checkout)"
        return f"tproxy-twist {head}{' + uncommitted changes' if dirty else ''}"


class TproxyTwistNoMetrics(TproxyTwist):
    """
    The same, with metrics off (`[metrics] listen = ""`: the workers stop
    counting): side by side with `tproxy-twist`, what metrics cost.  Not in
    the default run; ask for it with --only.
    """

    name = "tproxy-twist-nometrics"

    def prepare(self, lab: BenchLab, workdir: Path) -> list[str]:
        argv = super().prepare(lab, workdir)
        conf = workdir / "tproxy.toml"
        conf.write_text(conf.read_text().replace(f'listen = "{self.METRICS}"', 'listen = ""'))
        return argv

    def wait_ready(self, lab: BenchLab) -> None:
        # No /healthz without the metrics listener: wait for every worker's listener.
        deadline = time.monotonic() + 30
        while lab.listening(lab.router, TPROXY_PORT) < WORKERS:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tproxy-twist exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tproxy-twist did not listen {WORKERS} times within 30s")
            time.sleep(0.1)

    def relayed_requests(self, lab: BenchLab) -> int | None:
        return None  # nothing counts; the Via check proves the path


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout or proc.stderr).decode(errors="replace").strip().splitlines()[0]


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c for c in (Direct, HAProxy, Squid, TproxyTwist, TproxyTwistNoMetrics)
}
#: What a run measures when --only does not say.
DEFAULT_CONTENDERS = ("direct", "haproxy", "squid", "tproxy-twist")
