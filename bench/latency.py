"""Where a path's added latency goes: a client-side histogram next to the worker's own clock.

Usage (as root, from the checkout)::

    .venv/bin/python -m bench.latency [--only direct,haproxy,tproxy-twist] [--seconds 10]
        [--close] [--json FILE] [--raw DIR] [--attach 'py-spy record ... -p {pid}']
    .venv/bin/python -m bench.latency analyze DIR NAME   # again, from a --raw DIR

Builds the bench lab (bench/lab.py), starts nginx, then for each path in turn
runs the latency column's load (8 keep-alive connections, each pausing 8 ms
after every response: the closed loop of ``bench/run``'s p50/p99 columns)
from a small Python client in the client namespace (:func:`client`), which
records every request's send time and latency on ``CLOCK_MONOTONIC``.

For tproxy-twist the workers run with ``bench/latency_probe`` first on
``PYTHONPATH`` (its ``sitecustomize`` records every garbage collection,
reactor iteration and ``LoopingCall`` run on the same clock), so a slow
request can be lined up with what its worker was doing at the time:
:func:`attribute` says, for the requests slower than the p99, how many were
in flight during a collection, a sweep or a long reactor iteration.  For
every path, each serving process's scheduler statistics
(``/proc/PID/schedstat``: time on a CPU and time runnable but waiting for
one) are read before and after.

A diagnostic for bench/README.md "Added latency: where the p50 and p99 go",
not part of ``bench/run``.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import re
import selectors
import socket
import sys
import tempfile
import time
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE_DIR = HERE / "latency_probe"
CONNECTIONS = 8  # bench.measure.LATENCY_CONNECTIONS
DELAY = 0.008  # bench.measure.LATENCY_DELAY_MS

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


# -- the client (runs in the client namespace) ----------------------------------


def client(
    host: str,
    port: int,
    path: str,
    seconds: float,
    connections: int,
    delay: float,
    close: bool = False,
):
    """
    The closed loop of the latency column: ``connections`` keep-alive
    connections, each sending its next request ``delay`` seconds after the
    previous response ended (with ``close``: each request on a new
    connection, ``Connection: close``, its latency counted from the
    ``connect()``).  Returns ``(sent, latency)`` arrays: every request's
    start (``time.monotonic()``) and its latency in seconds (to the last
    byte of the response).
    """
    gc.disable()  # the client must not add pauses of its own
    extra = "Connection: close\r\n" if close else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
    sel = selectors.DefaultSelector()
    sent, latency, slots = array("d"), array("d"), array("d")

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        s.connect_ex((host, port))
        return s

    # per slot: [socket or None, next start time, start of the request in flight, buffer]
    start = time.monotonic()
    state = [[None, start + delay * i / connections, 0.0, b""] for i in range(connections)]
    if not close:
        for st in state:
            st[0] = socket.create_connection((host, port))
            st[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            st[0].setblocking(False)
            sel.register(st[0], selectors.EVENT_READ, st)
    end = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        wake = end
        for st in state:
            if st[2] == 0.0:
                if st[1] <= now:
                    st[2] = time.monotonic()
                    if close:
                        st[0] = connect()
                        sel.register(st[0], selectors.EVENT_WRITE, st)
                    else:
                        st[0].send(request)
                else:
                    wake = min(wake, st[1])
        for key, events in sel.select(max(0.0, wake - time.monotonic())):
            st = key.data
            if events & selectors.EVENT_WRITE:
                st[0].send(request)  # connected: a short request fits the empty buffer
                sel.modify(st[0], selectors.EVENT_READ, st)
                continue
            data = st[0].recv(65536)
            done = time.monotonic()
            if not data:
                raise RuntimeError("the server closed a connection before answering")
            buf = st[3] + data
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                st[3] = buf
                continue
            m = _CONTENT_LENGTH.search(buf, 0, head_end + 2)
            length = int(m.group(1)) if m else 0
            if len(buf) < head_end + 4 + length:
                st[3] = buf
                continue
            st[3] = buf[head_end + 4 + length :]
            sent.append(st[2])
            slots.append(float(state.index(st)))
            latency.append(done - st[2])
            st[2] = 0.0
            st[1] = done + delay
            if close:
                sel.unregister(st[0])
                st[0].close()
                st[0], st[3] = None, b""
    ports = [st[0].getsockname()[1] if st[0] is not None else 0 for st in state]
    for st in state:
        if st[0] is not None:
            st[0].close()
    return sent, latency, slots, ports


def _client_main(argv: list[str]) -> int:
    host, port, path, seconds, out, *how = argv
    close = how == ["close"]
    sent, latency, slots, ports = client(
        host, int(port), path, float(seconds), CONNECTIONS, DELAY, close
    )
    with open(out, "w") as f:
        json.dump(
            {
                "sent": sent.tolist(),
                "latency": latency.tolist(),
                "slots": slots.tolist(),
                "ports": ports,
            },
            f,
        )
    return 0


# -- analysis (pure) ---------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0-100) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(latency: list[float]) -> dict:
    """Percentiles in milliseconds."""
    return {
        "requests": len(latency),
        **{f"p{q:g}_ms": percentile(latency, q) * 1000 for q in (50, 90, 99, 99.9)},
        "max_ms": max(latency) * 1000 if latency else float("nan"),
    }


_LAYOUT = {"gc": 4, "polls": 5, "timed": 2, "loops": 3}  # floats per sample in a probe dump


def intervals(
    probe: dict, kind: str, min_duration: float = 0.0, generation: int | None = None
) -> list[tuple[float, float]]:
    """
    (start, end) of one kind of worker event in a probe's dump (``gc``,
    ``polls``: reactor iterations, ``timed``: delayed-call passes, ``loops``:
    LoopingCall runs), those lasting at least ``min_duration`` seconds (and,
    for ``gc``, of ``generation`` only, when given).
    """
    flat, width = probe[kind], _LAYOUT[kind]
    out = []
    for i in range(0, len(flat), width):
        start, end = flat[i], flat[i + 1]
        if generation is not None and flat[i + 2] != generation:
            continue
        if end - start >= min_duration:
            out.append((start, end))
    return out


def overlap(start: float, end: float, spans: list[tuple[float, float]], starts: list[float]):
    """Seconds of [start, end] covered by ``spans`` (sorted, ``starts`` their starts)."""
    covered = 0.0
    k = bisect.bisect_right(starts, end) - 1
    while k >= 0:
        s, e = spans[k]
        if e > start:
            covered += min(e, end) - max(s, start)
        elif start - s > 1.0:  # no event lasts a second: nothing earlier reaches
            break
        k -= 1
    return min(covered, end - start)  # the events of two workers may overlap each other


def attribute(sent: list[float], latency: list[float], probes: list[dict]) -> dict:
    """
    For the requests at or above the p99 (and the p90): the share of them
    in flight while a worker was collecting garbage, running a LoopingCall
    (the sweep with its metrics flush, the heartbeat) or in a long reactor
    iteration, and the share of their summed latency that such events
    covered, next to the same shares for all requests.  Events of both
    workers count (the client does not know which worker served a request),
    so the shares are upper bounds.
    """
    kinds = {
        "gc, any generation": ("gc", 0.0, None),
        "gc, generation 2": ("gc", 0.0, 2),
        "LoopingCall (sweep + metrics flush, heartbeat)": ("loops", 0.0, None),
        "reactor iteration >= 1 ms": ("polls", 0.001, None),
        "reactor iteration >= 2 ms": ("polls", 0.002, None),
    }
    groups = {
        "all": range(len(latency)),
        "p90": [i for i, d in enumerate(latency) if d >= percentile(latency, 90)],
        "p99": [i for i, d in enumerate(latency) if d >= percentile(latency, 99)],
    }
    out: dict = {"p99_ms": percentile(latency, 99) * 1000, "p90_ms": percentile(latency, 90) * 1000}
    for label, (kind, minimum, generation) in kinds.items():
        spans = sorted(sp for p in probes for sp in intervals(p, kind, minimum, generation))
        starts = [s for s, _ in spans]
        row: dict = {"events": len(spans)}
        for group, members in groups.items():
            covered = [overlap(sent[i], sent[i] + latency[i], spans, starts) for i in members]
            n = max(1, len(covered))
            row[f"{group}_in_flight_share"] = sum(1 for c in covered if c > 0) / n
            row[f"{group}_time_share"] = sum(covered) / max(1e-12, sum(latency[i] for i in members))
        out[label] = row
    return out


def worker_stats(probe: dict) -> dict:
    """Durations (ms) of a worker's collections, iterations and periodic calls."""

    def stats(durations: list[float]) -> dict:
        if not durations:
            return {"n": 0}
        return {
            "n": len(durations),
            "p50_ms": percentile(durations, 50) * 1000,
            "p99_ms": percentile(durations, 99) * 1000,
            "max_ms": max(durations) * 1000,
        }

    g = probe["gc"]
    by_gen = {gen: [g[i + 1] - g[i] for i in range(0, len(g), 4) if g[i + 2] == gen]
              for gen in (0, 1, 2)}  # fmt: skip
    p = probe["polls"]
    handling = [p[i + 1] - p[i] for i in range(0, len(p), 5)]
    handling_cpu = [p[i + 4] for i in range(0, len(p), 5)]
    off_cpu = [p[i + 1] - p[i] - p[i + 4] for i in range(0, len(p), 5)]
    loops = probe["loops"]
    names = probe["loop_names"]
    by_loop: dict[str, list[float]] = {}
    for i in range(0, len(loops), 3):
        by_loop.setdefault(names[str(int(loops[i + 2]))], []).append(loops[i + 1] - loops[i])
    t = probe["timed"]
    return {
        "gc_objects": probe["gc_objects"],
        "gc_frozen": probe["gc_frozen"],
        "gc": {f"gen{gen}": stats(d) for gen, d in by_gen.items()},
        "iteration_handling": stats(handling),
        "iteration_handling_cpu": stats(handling_cpu),
        "iteration_handling_off_cpu": stats(off_cpu),
        "events_per_iteration": (sum(p[i + 2] for i in range(0, len(p), 5)) / (len(p) / 5))
        if p
        else 0,
        "timed_calls": stats([t[i + 1] - t[i] for i in range(0, len(t), 2)]),
        "looping_calls": {name: stats(d) for name, d in by_loop.items()},
    }


def per_worker(samples: dict) -> dict:
    """The client's percentiles per worker (``owners``: each slot's worker pid)."""
    owners = samples["owners"]
    by: dict[int, list[float]] = {}
    for slot, d in zip(samples["slots"], samples["latency"], strict=True):
        by.setdefault(owners[int(slot)], []).append(d)
    return {
        str(pid): {"connections": owners.count(pid), **summary(d)} for pid, d in sorted(by.items())
    }


def analyze(raw: Path, name: str) -> dict:
    """The client summary, worker statistics and attribution of a run kept with ``--raw``."""
    samples = json.loads((raw / f"{name}-client.json").read_text())
    probes = [json.loads(f.read_text()) for f in sorted(raw.glob(f"{name}-worker-*.json"))]
    out: dict = {"client": summary(samples["latency"])}
    if "owners" in samples:
        out["per_worker"] = per_worker(samples)
    if probes:
        out["workers"] = [worker_stats(p) for p in probes]
        out["attribution"] = attribute(samples["sent"], samples["latency"], probes)
    return out


# -- scheduler statistics --------------------------------------------------------------


def schedstat(pid: int) -> tuple[int, ...]:
    """
    (ns on a CPU, ns runnable but waiting, time slices) of ``pid``'s threads
    summed, then its user and system CPU time in ns (``/proc/PID/stat``, in
    clock ticks).
    """
    total = [0, 0, 0, 0, 0]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                for k, v in enumerate(f.read().split()[:3]):
                    total[k] += int(v)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = 1e9 / os.sysconf("SC_CLK_TCK")
        total[3], total[4] = int(fields[11]) * tick, int(fields[12]) * tick
    except OSError:
        pass
    return tuple(total)


# -- the driver --------------------------------------------------------------------------


def _serving_pids(lab, contender) -> dict[str, list[int]]:
    from .contenders import _cmdline

    pids = {"proxy": contender.worker_pids(lab) if contender.diverted else []}
    pids["nginx"] = [p for p in _netns_pids(lab.origin) if _cmdline(p).startswith("nginx: worker")]
    return pids


def _connection_owners(lab) -> dict[int, int]:
    """Client port -> pid of the router process holding the diverted connection."""
    import subprocess

    proc = subprocess.run(
        ["ip", "netns", "exec", lab.router, "ss", "-Htnp", "state", "established",
         "sport", "=", ":80"],
        capture_output=True, check=False, timeout=30,
    )  # fmt: skip
    owners = {}
    for line in proc.stdout.decode().splitlines():
        fields = line.split()
        m = re.search(r"pid=(\d+)", line)
        if len(fields) >= 4 and m:
            owners[int(fields[3].rsplit(":", 1)[1])] = int(m.group(1))
    return owners


def _netns_pids(ns: str) -> list[int]:
    import subprocess

    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, check=False)
    return [int(p) for p in proc.stdout.split()]


def run_path(
    lab,
    contender,
    seconds: float,
    raw: Path | None,
    attach: str | None = None,
    close: bool = False,
) -> dict:
    import subprocess

    from .lab import SMALL_PATH

    probe_dir = Path(tempfile.mkdtemp(prefix="probe-", dir=lab.tmpdir))
    os.chmod(probe_dir, 0o777)
    saved = os.environ.get("PYTHONPATH"), os.environ.get("TPROXY_TWIST_LATENCY_PROBE")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE_DIR), saved[0]) if p)
    os.environ["TPROXY_TWIST_LATENCY_PROBE"] = str(probe_dir)
    try:
        contender.start(lab)
    finally:
        for key, value in zip(("PYTHONPATH", "TPROXY_TWIST_LATENCY_PROBE"), saved, strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result: dict = {"name": contender.name}
    try:
        if contender.diverted:
            lab.divert_to_proxy()
        port = 80 if contender.diverted else 8080
        from .bench import verify

        verify(lab, contender, f"http://{lab.ORIGIN4}" + ("" if port == 80 else ":8080"))
        pids = _serving_pids(lab, contender)
        before = {k: [schedstat(p) for p in v] for k, v in pids.items()}
        out = lab.tmpdir / f"client-{contender.name}.json"
        client_env = dict(os.environ)
        client_env.pop("TPROXY_TWIST_LATENCY_PROBE", None)
        attached = [
            subprocess.Popen(attach.format(pid=pid, name=contender.name), shell=True)
            for pid in (pids["proxy"] if attach else [])
        ]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client, sys.executable, "-m", "bench.latency",
             "client", lab.ORIGIN4, str(port), SMALL_PATH, str(seconds), str(out),
             *(["close"] if close else [])],
            cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env,
        )  # fmt: skip
        time.sleep(min(1.0, seconds / 2))  # the connections are open by then
        owners = _connection_owners(lab) if not close else {}
        _, err = proc.communicate(timeout=seconds + 60)
        for p in attached:
            p.wait(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"latency client failed: {err.decode()[-2000:]}")
        after = {k: [schedstat(p) for p in v] for k, v in pids.items()}
        samples = json.loads(out.read_text())
        result["client"] = summary(samples["latency"])
        result["rps"] = len(samples["latency"]) / seconds
        if owners and len(pids["proxy"]) > 1:
            samples["owners"] = [owners.get(p, 0) for p in samples["ports"]]
            result["per_worker"] = per_worker(samples)
        result["sched"] = {}
        for k in pids:
            run = sum(a[0] - b[0] for a, b in zip(after[k], before[k], strict=True))
            wait = sum(a[1] - b[1] for a, b in zip(after[k], before[k], strict=True))
            slices = sum(a[2] - b[2] for a, b in zip(after[k], before[k], strict=True))
            user = sum(a[3] - b[3] for a, b in zip(after[k], before[k], strict=True))
            system = sum(a[4] - b[4] for a, b in zip(after[k], before[k], strict=True))
            n = max(1, len(samples["latency"]))
            result["sched"][k] = {
                "processes": len(pids[k]),
                "cpu_us_per_request": run / 1000 / n,
                "user_us_per_request": user / 1000 / n,
                "system_us_per_request": system / 1000 / n,
                "runnable_wait_us_per_request": wait / 1000 / n,
                "wait_us_per_slice": wait / 1000 / max(1, slices),
                "slices_per_request": slices / n,
            }
    finally:
        lab.remove_rules()
        contender.stop(lab)
    if hasattr(contender, "access_log_lines"):
        result["access_log_lines"] = contender.access_log_lines
    probes = []
    for f in sorted(probe_dir.glob("worker-*.json")):
        probes.append(json.loads(f.read_text()))
    if probes:
        result["workers"] = [worker_stats(p) for p in probes]
        result["attribution"] = attribute(samples["sent"], samples["latency"], probes)
    if raw is not None:
        raw.mkdir(parents=True, exist_ok=True)
        (raw / f"{contender.name}-client.json").write_text(json.dumps(samples))
        for p in probes:
            (raw / f"{contender.name}-worker-{p['pid']}.json").write_text(json.dumps(p))
    return result


def _with_access_log(contender_class):
    """``contender_class`` (tproxy-twist) with an access log in its lab directory."""

    class WithAccessLog(contender_class):
        def start(self, lab) -> None:
            write_text = Path.write_text

            def write(path: Path, text: str, *args, **kwargs):
                if path.name == "tproxy.toml":
                    log = path.parent / "access.log"
                    text = text.replace(
                        "\n[[port]]", f'\n[access_log]\npath = "{log}"\n\n[[port]]', 1
                    )
                return write_text(path, text, *args, **kwargs)

            Path.write_text = write
            try:
                super().start(lab)
            finally:
                Path.write_text = write_text

        def stop(self, lab) -> None:
            super().stop(lab)
            log = self.dir / "access.log"
            self.access_log_lines = len(log.read_bytes().splitlines()) if log.exists() else 0

    WithAccessLog.name = contender_class.name
    return WithAccessLog


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        return _client_main(argv[1:])
    if argv and argv[0] == "analyze":
        print(json.dumps(analyze(Path(argv[1]), argv[2]), indent=1))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.latency")
    parser.add_argument("--only", default="direct,haproxy,tproxy-twist")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--access-log", action="store_true", help="tproxy-twist writes an access log (squid format)"
    )
    parser.add_argument(
        "--close", action="store_true", help="a new connection per request (Connection: close)"
    )
    parser.add_argument("--raw", type=Path, help="keep every sample and probe dump here")
    parser.add_argument(
        "--attach",
        help="a shell command run next to the load for each proxy process, with {pid} and"
        " {name} filled in (e.g. py-spy record ... -p {pid}); it must end by itself",
    )
    opts = parser.parse_args(argv)
    from .bench import raise_fd_limit
    from .contenders import CONTENDERS
    from .lab import BenchLab

    raise_fd_limit()
    results = []
    with BenchLab() as lab:
        lab.start_nginx()
        for name in opts.only.split(","):
            cls = CONTENDERS[name]
            if opts.access_log and name.startswith("tproxy-twist"):
                cls = _with_access_log(cls)
            contender = cls()
            print(f"[{name}] {opts.seconds:g}s of the latency load", file=sys.stderr)
            results.append(
                run_path(lab, contender, opts.seconds, opts.raw, opts.attach, opts.close)
            )
            print(json.dumps(results[-1], indent=1), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
