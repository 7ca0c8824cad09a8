"""
What one relayed exchange costs a worker, in CPU time (or instructions).

    sudo PYTHONPATH=. .venv/bin/python -m bench.exchange_cost [--tree DIR] [-n N]
        [--concurrency C] [--access-log on|off] [--metrics on|off] [--callgrind]

One real worker (C{python -m tproxy_twist.worker}, the way the master starts
it: the worker reactor, L{ProxyService}'s factory for one C{tproxy} port with
every key at its default, metrics on with a temporary multiprocess
directory, the access log on) runs in the router namespace of a throwaway
lab (L{bench.lab.BenchLab}: client 198.51.100.2 -- router -- origin
203.0.113.2, nftables TPROXY, documentation addresses only).  A tiny origin
(asyncio, its own process) answers C{ok} (C{--heads browser}: the client
sends Firefox's head, the origin answers with nginx's).  A client process sends N
keep-alive exchanges over C connections, then N exchanges on a new
connection each (C{Connection: close}); after a warm-up of its own in each
mode, the worker's CPU time is read around the measured exchanges from
C{/proc/PID/task/*/schedstat} (nanoseconds on a CPU, every thread:
the reactor and the access log's writer) and C{/proc/PID/stat} (user and
system ticks).  Printed: microseconds of worker CPU per exchange.

On a shared machine the figures scatter by a few per cent between runs
(other processes evict caches; the client's batching depends on the relative
speeds); compare trees in alternating runs.  C{--callgrind} runs the worker
under C{valgrind --tool=callgrind} with instrumentation switched on only for
the measured exchanges (C{callgrind_control -i on}), and prints instructions
per exchange: deterministic to well under a per cent, but it counts user
space only and runs about 50 times slower (use a smaller C{-n}).

C{--tree DIR} runs the worker of another checkout (for A/B and bisecting:
C{git worktree add --detach /work/ab-x REV}); the lab, the client and the
origin are always this checkout's.  Every tree whose worker takes
C{--config FILE} and reads C{[[port]]}, C{[metrics] listen} and
C{[access_log] path} works (0588e44 and later).

Root only (namespaces).  Everything is removed again, also on failure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from bench.lab import TPROXY_PORT, BenchLab

ORIGIN_ADDRESS = "203.0.113.2"

ORIGIN = r"""
import asyncio, sys
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
if sys.argv[1] == "browser":  # what nginx answers for a small static file
    ANSWER = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\n"
        b"Content-Type: application/javascript\r\nContent-Length: 3\r\n"
        b"Last-Modified: Mon, 30 Nov 2026 11:00:00 GMT\r\nConnection: keep-alive\r\n"
        b'ETag: "5f-3"\r\nAccept-Ranges: bytes\r\n\r\nok\n'
    )
async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", 80, backlog=4096)
    await server.serve_forever()
asyncio.run(main())
"""

# The client: C connections, N exchanges in all; keep-alive (one connection
# per slot) or new (a connection per exchange).  It warms up, says "warm",
# waits for "go" on stdin, does the measured exchanges, says "done".
CLIENT = r"""
import selectors, socket, sys
mode, host, heads = sys.argv[1], sys.argv[5], sys.argv[6]
n, warm, concurrency = (int(a) for a in sys.argv[2:5])
close = mode == "new"
REQUEST = (
    f"GET /small HTTP/1.1\r\nHost: {host}\r\nUser-Agent: exchange-cost\r\nAccept: */*\r\n"
    + ("Connection: close\r\n" if close else "") + "\r\n"
).encode()
if heads == "browser":  # what Firefox sends for a script
    REQUEST = (
        f"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0 (X11;"
        " Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\nAccept: */*\r\n"
        "Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\nReferer: http://{host}/\r\n\r\n"
    ).encode()
sel = selectors.DefaultSelector()

def answered(buf):
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].lower()
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise SystemExit("answer without Content-Length: " + repr(buf[:200]))
    length = int(head[i + 17:].split(b"\r\n", 1)[0])
    if not head.startswith(b"http/1.1 200"):
        raise SystemExit("unexpected answer: " + repr(buf[:300]))
    return len(buf) >= end + 4 + length

def run(total):
    started = 0
    done = 0
    def start(sock=None):
        nonlocal started
        started += 1
        if sock is None:
            sock = socket.create_connection((host, 80))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, [b""])
        else:
            sel.get_key(sock).data[0] = b""
        sock.send(REQUEST)
    for _ in range(min(concurrency, total)):
        start()
    while done < total:
        for key, _ in sel.select(30):
            sock = key.fileobj
            data = sock.recv(65536)
            state = key.data
            if data:
                state[0] += data
                if close or not answered(state[0]):
                    continue
            elif not close or not answered(state[0]):
                raise SystemExit("connection closed before the answer: " + repr(state[0][:300]))
            done += 1
            if close:
                sel.unregister(sock)
                sock.close()
                if started < total:
                    start()
            elif started < total:
                start(sock)
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()

run(warm)
print("warm", flush=True)
sys.stdin.readline()
run(n)
print("done", flush=True)
"""


def cpu(pid: int) -> tuple[int, int, int]:
    """(nanoseconds on a CPU over every thread, user ticks, system ticks) of C{pid}."""
    ns = 0
    for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(stat) as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return ns, int(fields[11]), int(fields[12])


def worker_config(tmp: Path, access_log: bool, metrics: bool) -> str:
    return (
        "workers = 1\n"
        "[access_log]\n"
        f'path = "{tmp / "access.log" if access_log else ""}"\n'
        "[metrics]\n"
        f'listen = "{"127.0.0.1:9464" if metrics else ""}"\n'
        "[[port]]\n"
        'name = "tproxy"\n'
        f'listen = "0.0.0.0:{TPROXY_PORT}"\n'
        'mode = "tproxy"\n'
    )


def measure(lab: BenchLab, opts, tree: Path) -> dict:
    tmp = lab.tmpdir / "cost"
    tmp.mkdir()
    prom = tmp / "prom"
    prom.mkdir()
    config = tmp / "tproxy.toml"
    config.write_text(worker_config(tmp, opts.access_log == "on", opts.metrics == "on"))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(tree),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
        PYTHONHASHSEED="0",
        PYTHONUNBUFFERED="1",
    )
    # As the master starts it: our pid as the master's (the worker watches its
    # stdin, a pipe we never write to, and dies with us).
    env["TPROXY_TWIST_MASTER_PID"] = str(os.getpid())
    argv = [sys.executable, "-m", "tproxy_twist.worker", "--config", str(config)]
    cg_out = opts.cg_out = tmp / "callgrind.out"
    if opts.callgrind:
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={cg_out}",
            *argv,
        ]
    # The worker writes status lines to fd 3 when it is open, and `ip netns
    # exec` leaves its namespace file there: point fd 3 at /dev/null.
    argv = ["sh", "-c", 'exec 3>/dev/null; exec "$@"', "sh", *argv]
    log = tmp / "worker.log"
    with open(log, "ab") as out:
        # In the tree's directory: `python -m` puts the working directory first on
        # sys.path, before PYTHONPATH, so from another checkout its code would run.
        worker = lab.popen(
            lab.router, argv, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE, cwd=str(tree),
        )  # fmt: skip
    lab.wait_listening(lab.router, TPROXY_PORT, worker, log, timeout=120)
    lab.divert_to_proxy()
    results = {}
    for mode in opts.modes.split(","):
        if opts.wrk:
            results[mode] = _measure_wrk(lab, opts, worker, mode)
            continue
        client = lab.popen(
            lab.client,
            [
                sys.executable,
                "-c",
                CLIENT,
                "new" if mode == "new" else "keep",
                str(opts.n),
                str(opts.warm),
                str(opts.concurrency),
                ORIGIN_ADDRESS,
                opts.heads,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ),
        )
        _expect(client, b"warm", opts.timeout, worker)
        time.sleep(0.3)  # let the last warm-up connections close (TIME_WAIT is the kernel's)
        if opts.callgrind:
            _callgrind_control(worker.pid, "--instr=on")
        before = cpu(worker.pid)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        _expect(client, b"done", opts.timeout, worker)
        after = cpu(worker.pid)
        if opts.callgrind:
            _callgrind_control(worker.pid, "--dump=" + mode)
            _callgrind_control(worker.pid, "--instr=off")
        client.wait(timeout=30)
        tick = os.sysconf("SC_CLK_TCK")
        n = opts.n
        result = {
            "cpu_us": (after[0] - before[0]) / 1e3 / n,
            "user_us": (after[1] - before[1]) * 1e6 / tick / n,
            "sys_us": (after[2] - before[2]) * 1e6 / tick / n,
        }
        if opts.callgrind:
            result["instructions"] = _instructions(cg_out, mode) / n
        results[mode] = result
    lab.remove_rules()
    lab.stop_process(worker)
    _keep_dumps(opts, tmp)
    return results


def children(pid: int) -> list[int]:
    """The pids whose parent is C{pid}."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def measure_master(lab: BenchLab, opts, tree: Path) -> dict:
    """
    The whole proxy as bench/run starts it (C{twistd -n tproxy}, a master and
    C{workers = 2}) under wrk: CPU per request of the master and of the workers.
    """
    from tproxy_twist.lab.topology import TWISTD

    tmp = lab.tmpdir / "cost"
    tmp.mkdir()
    config = tmp / "tproxy.toml"
    config.write_text(
        worker_config(tmp, opts.access_log == "on", opts.metrics == "on").replace(
            "workers = 1", f"workers = {opts.workers}"
        )
    )
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), PYTHONHASHSEED="0", PYTHONUNBUFFERED="1")
    log = tmp / "twistd.log"
    argv = [*TWISTD, "-n", "--pidfile=", "tproxy", "--config", str(config)]
    if opts.callgrind:
        # The master starts its workers with sys.executable: make that a
        # script that runs the interpreter under callgrind.
        wrapper = tmp / "python-callgrind"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no"
            f' --callgrind-out-file={tmp}/callgrind.out.%p {sys.executable} "$@"\n'
        )
        wrapper.chmod(0o755)
        argv = [
            sys.executable, "-c",
            f"import sys; sys.executable = {str(wrapper)!r}; sys.argv[0] = 'twistd';"
            " from twisted.scripts.twistd import run; run()",
            *argv[3:],
        ]  # fmt: skip
    with open(log, "ab") as out:
        master = lab.popen(
            lab.router, argv, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=str(tree), start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while lab.listening(lab.router, TPROXY_PORT) < opts.workers:
        if master.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"twistd did not start its workers: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    time.sleep(2)
    lab.divert_to_proxy()
    workers = children(master.pid)
    results = {}
    for mode in opts.modes.split(","):
        from bench.measure import wrk

        url = f"http://{ORIGIN_ADDRESS}/small"
        close = mode == "new"
        wrk(lab, url, seconds=1, close=close)  # warm
        time.sleep(0.3)
        spy = None
        if opts.py_spy:
            # One worker, sampled while wrk runs: collapsed stacks for a flame graph.
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                    "--format", "raw", "--rate", "200", "--pid", str(workers[0]),
                    "--duration", str(int(opts.wrk)), "--output", f"{opts.py_spy}.{mode}.txt",
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        if opts.callgrind:
            for pid in workers:
                _callgrind_control(pid, "--instr=on")
        before = {pid: cpu(pid) for pid in [master.pid, *workers]}
        run = wrk(lab, url, seconds=opts.wrk, close=close)
        after = {pid: cpu(pid) for pid in [master.pid, *workers]}
        instructions = 0
        if opts.callgrind:
            for pid in workers:
                _callgrind_control(pid, "--dump=" + mode)
                _callgrind_control(pid, "--instr=off")
                instructions += _instructions(tmp / f"callgrind.out.{pid}", mode)
        if spy is not None:
            spy.wait(timeout=60)
        n = run["requests"]
        used = {pid: (after[pid][0] - before[pid][0]) / 1e3 / n for pid in before}
        tick = os.sysconf("SC_CLK_TCK")
        user = sum(after[w][1] - before[w][1] for w in workers) * 1e6 / tick / n
        system = sum(after[w][2] - before[w][2] for w in workers) * 1e6 / tick / n
        results[mode] = {
            "cpu_us": sum(used.values()),
            "master_us": used[master.pid],
            "workers_us": sum(used[w] for w in workers),
            **({"instructions": instructions / n} if opts.callgrind else {}),
            "user_us": user,
            "sys_us": system,
            "requests": n,
            "rps": run["rps"],
            "errors": run["errors"],
        }
    lab.remove_rules()
    lab.stop_process(master)
    _keep_dumps(opts, tmp)
    return results


def _keep_dumps(opts, tmp: Path) -> None:
    """Copy the callgrind dumps to --keep-dumps DIR (for callgrind_annotate)."""
    if opts.callgrind and opts.keep_dumps:
        import shutil

        os.makedirs(opts.keep_dumps, exist_ok=True)
        for path in glob.glob(f"{tmp}/callgrind.out*"):
            shutil.copy(path, opts.keep_dumps)


def _measure_wrk(lab: BenchLab, opts, worker, mode: str) -> dict:
    """CPU per request while wrk (-t2 -c64, as bench/run) loads the worker for --wrk seconds."""
    from bench.measure import wrk

    url = f"http://{ORIGIN_ADDRESS}/small"
    close = mode == "new"
    wrk(lab, url, seconds=1, close=close)  # warm
    time.sleep(0.3)
    if opts.callgrind:
        _callgrind_control(worker.pid, "--instr=on")
    before = cpu(worker.pid)
    run = wrk(lab, url, seconds=opts.wrk, close=close)
    after = cpu(worker.pid)
    n = run["requests"]
    tick = os.sysconf("SC_CLK_TCK")
    extra = {}
    if opts.callgrind:
        _callgrind_control(worker.pid, "--dump=" + mode)
        _callgrind_control(worker.pid, "--instr=off")
        extra["instructions"] = _instructions(opts.cg_out, mode) / n
    return {
        **extra,
        "cpu_us": (after[0] - before[0]) / 1e3 / n,
        "user_us": (after[1] - before[1]) * 1e6 / tick / n,
        "sys_us": (after[2] - before[2]) * 1e6 / tick / n,
        "requests": n,
        "rps": run["rps"],
        "errors": run["errors"],
    }


def _expect(client: subprocess.Popen, word: bytes, timeout: float, worker) -> None:
    ready, _, _ = select.select([client.stdout], [], [], timeout)
    line = client.stdout.readline() if ready else b""
    if line.strip() != word:
        client.kill()
        raise SystemExit(
            f"client: expected {word!r}, got {line!r} (worker alive: {worker.poll() is None})"
        )


def _callgrind_control(pid: int, what: str) -> None:
    subprocess.run(["callgrind_control", what, str(pid)], check=True, capture_output=True)


def _instructions(out: Path, mode: str) -> int:
    """Ir of the dump made after C{mode}'s measured exchanges."""
    for path in sorted(glob.glob(f"{out}.[0-9]*")):
        with open(path) as f:
            text = f.read()
        if f"desc: Trigger: dump {mode}\n" in text:
            for line in text.splitlines():
                if line.startswith("summary:") or line.startswith("totals:"):
                    return int(line.split()[1])
    raise SystemExit(f"no callgrind dump for {mode} in {out}*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange_cost")
    parser.add_argument("-n", type=int, default=20000, help="measured exchanges per mode")
    parser.add_argument("--warm", type=int, default=2000, help="warm-up exchanges per mode")
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--access-log", choices=("on", "off"), default="on")
    parser.add_argument("--metrics", choices=("on", "off"), default="on")
    parser.add_argument(
        "--heads",
        choices=("small", "browser"),
        default="small",
        help="small: a 4-line request and a 3-line answer (the default); browser: a Firefox"
        " request (with Connection: keep-alive) and nginx's answer (with Connection:"
        " keep-alive), for the counted client",
    )
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--keep-dumps", metavar="DIR", help="with --callgrind: copy the dumps here")
    parser.add_argument(
        "--wrk",
        type=float,
        default=0,
        metavar="S",
        help="load with wrk -t2 -c64 for S seconds per mode instead of the counted client"
        " (with --callgrind, one mode per run: callgrind's second dump after toggling"
        " instrumentation under wrk came out wrong here)",
    )
    parser.add_argument(
        "--master",
        action="store_true",
        help="run the whole twistd tproxy (master, 2 workers) under wrk; CPU of each part",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="with --master: py-spy one worker during each wrk run into PREFIX.<mode>.txt"
        " (collapsed stacks; .venv/bin/pip install py-spy first)",
    )
    parser.add_argument("--workers", type=int, default=2, help="with --master (default 2)")
    parser.add_argument(
        "--modes", default="keep-alive,new", help="keep-alive, new or both (the default)"
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.exchange_cost: run as root (network namespaces)", file=sys.stderr)
        return 2
    lab = BenchLab()
    with lab:
        origin = lab.popen(
            lab.origin, [sys.executable, "-c", ORIGIN, opts.heads], env=dict(os.environ)
        )
        lab.wait_listening(lab.origin, 80, origin, lab.tmpdir / "none")
        if opts.master:
            if not opts.wrk:
                opts.wrk = 5
            results = measure_master(lab, opts, opts.tree.resolve())
        else:
            results = measure(lab, opts, opts.tree.resolve())
    if opts.json:
        print(json.dumps({"tree": str(opts.tree), **results}))
        return 0
    load = (
        f"wrk -t2 -c64, {opts.wrk:g} s"
        if opts.wrk
        else f"{opts.n} measured, {opts.concurrency} conns"
    )
    print(f"worker of {opts.tree}: CPU per exchange ({load})")
    for mode, r in results.items():
        if "master_us" in r:
            line = (
                f"  {mode:10s} {r['cpu_us']:7.1f} us  (master {r['master_us']:.1f},"
                f" workers {r['workers_us']:.1f}: user {r['user_us']:.1f}, system"
                f" {r['sys_us']:.1f}; {r['rps']:,.0f} req/s)"
            )
        else:
            line = (
                f"  {mode:10s} {r['cpu_us']:7.1f} us"
                f"  (user {r['user_us']:.1f}, system {r['sys_us']:.1f})"
            )
        if "instructions" in r:
            line += f"  {r['instructions'] / 1000:,.1f} k instructions"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
