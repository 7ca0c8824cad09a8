"""
What a bumped request and a new bumped connection cost the worker, in CPU
seconds, on loopback in one process: the figure that does not depend on how
busy the rest of the machine is (wall-clock req/s does).

    PYTHONPATH=. .venv/bin/python -m bench.bump_cpu [--seconds 5] [--connections 16]
        [--only plain,plain-new,bump-keepalive,bump-new] [--pin] [--profile DIR] [--gc-freeze]
        [--gc-stats]
        [--no-resumption] [--twisted-connector] [--in-memory]
    PYTHONPATH=. .venv/bin/python -m bench.bump_cpu --alternate 10 [--seconds 4]
        [--connections 64] [--pin]

This process is the worker: the real TLS port factory (L{tls_factory}, bump
for every connection, the real bump kit from a CA made with C{tproxy-twist
ca init}) and, to compare, the real HTTP relay of a tproxy port, on the
worker's reactor.  nginx on 127.0.0.1 is the origin (HTTPS with a
certificate from a CA made here, and plain HTTP), wrk the client; their CPU
is not counted.  Without TPROXY the "original destination" is the listening
address, so the injected C{connect} sends every upstream connection to
nginx's port (through the worker's connector, L{connect_upstream}; Twisted's
C{connectTCP} with C{--twisted-connector}); wrk connects to C{localhost}
(the proxy listens on 127.0.0.1 and ::1), the SNI and the name verified and
forged for.

Rows: C{plain} (keep-alive through the HTTP relay), C{plain-new} (the same
with C{Connection: close}: a new client and upstream connection per
request), C{bump-keepalive}
(keep-alive over bumped connections: each handshaken once), C{bump-new}
(C{Connection: close}: origin handshake, verification, client handshake per
request).  Each: requests, the worker's CPU milliseconds per request, and
wrk's req/s (noise on a shared machine; CPU per request is the measure);
beside them the peers' CPU milliseconds per request (nginx's processes and
wrk) and nginx's voluntary context switches per request (how often the
origin went to sleep waiting for the proxy: what the worker's batching of
its writes changes, bench/README "Writes held to the end of the batch").
C{--profile DIR} writes a cProfile (CPU time) of each row to DIR/<row>.prof;
C{--no-resumption}: the origin resumes no session (as in bench/tls.py);
C{--in-memory}: instead, the bump's TLS alone, no sockets: CPU per handshake
pair (our server with its leaf, our verifying client: L{MemoryTLS} on both
ends over fake transports) and per bumped request's TLS work (a request and
its response through both ends: two encryptions, two decryptions).
C{--pin}: the worker on the first CPU it may use, alone, wrk and nginx on
the others (on a router the clients and origins are other machines; sharing
two CPUs with them, the worker's CPU per request also pays for what their
work does to its caches, more behind TLS peers).
C{--alternate ROUNDS}: the measure of "bumped keep-alive against the plain
relay" (issue 13's 0.7): C{plain} and C{bump-keepalive} in turns, ROUNDS
each (which goes first alternates), each run counted over its steady window
only (from a second after wrk started, its connections made and handshaken,
to half a second before it stops; requests as the port's metrics counted
them), the ratio of their CPU per request printed per round, then the median
and the ratio over all rounds.  Rows run one after the other minutes apart
see a different machine on a shared VM (the plain row alone moved from 0.08
to 0.11 ms a request between runs): a ratio of runs seconds apart is the
figure to quote.
C{--gc-freeze}: C{gc.freeze()} after the warm-up (what a worker that froze
its start-up objects would see; the worker does not today).  C{--gc-stats}:
the cyclic GC's collections, CPU and the objects it freed (garbage only it
could free: reference cycles), per request.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tproxy_twist import reactor as worker_reactor

reactor = worker_reactor.install()

from tproxy_twist import config as C  # noqa: E402
from tproxy_twist.http.relay import ProxyFactory, RelaySettings  # noqa: E402
from tproxy_twist.metrics import PortMetrics  # noqa: E402
from tproxy_twist.sockets import connect_upstream, serve_accepts  # noqa: E402
from tproxy_twist.tls.bumpkit import load_bump_kit  # noqa: E402
from tproxy_twist.tls.layer import tls_factory  # noqa: E402
from tproxy_twist.tls.testing import make_ca, make_server_cert  # noqa: E402

BODY = b"x" * 512 + b"\n"
TWISTED_CONNECTOR = False  # --twisted-connector
NGINX = """\
daemon off;
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    ssl_session_cache {session_cache};
    ssl_session_tickets {tickets};
    server {{
        listen 127.0.0.1:{https} ssl;
        listen 127.0.0.1:{http};
        ssl_certificate {tmp}/origin.pem;
        ssl_certificate_key {tmp}/origin.key;
        root {tmp}/www;
    }}
}}
"""
CONFIG = """\
[tls]
ca_cert = "{tmp}/proxy-ca/ca.pem"
ca_key = "{tmp}/proxy-ca/ca.key"
ca_bundle = "{tmp}/origin-ca.pem"

[[port]]
name = "plain"
listen = "127.0.0.1:1"
mode = "tproxy"

[[port]]
name = "bump"
listen = "127.0.0.1:2"
mode = "tproxy"
protocol = "tls"
[port.tls]
default = "bump"
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(tmp: Path, resumable: bool = True) -> tuple[subprocess.Popen, int, int, C.Config]:
    origin_ca = make_ca("bump_cpu origin CA")
    origin = make_server_cert(["localhost", "127.0.0.1"], origin_ca)
    (tmp / "origin-ca.pem").write_bytes(origin_ca.cert_pem)
    (tmp / "origin.pem").write_bytes(origin.cert_pem)
    (tmp / "origin.key").write_bytes(origin.key_pem)
    (tmp / "www").mkdir()
    (tmp / "www" / "small").write_bytes(BODY)
    https, http = free_port(), free_port()
    (tmp / "nginx.conf").write_text(
        NGINX.format(
            tmp=tmp,
            https=https,
            http=http,
            session_cache="shared:bench:10m" if resumable else "off",
            tickets="on" if resumable else "off",
        )
    )
    nginx = subprocess.Popen(
        ["nginx", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [sys.executable, "-m", "tproxy_twist.cli", "ca", "init", "--dir", str(tmp / "proxy-ca"),
         "--name", "bump_cpu proxy CA"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    config = C.loads(CONFIG.format(tmp=tmp), str(tmp / "bench.toml"))
    for _ in range(100):
        try:
            import socket

            socket.create_connection(("127.0.0.1", https), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return nginx, https, http, config


def to(port: int):
    """
    An UpstreamConnect that sends every upstream connection to 127.0.0.1:C{port},
    through the worker's own connector (L{connect_upstream}: non-blocking socket,
    TCP_NODELAY before connect, no address parsing), as a worker does; with
    C{--twisted-connector}, Twisted's C{connectTCP} (what this bench used before
    branch bumpconn: about 0.1 ms more per upstream connection; its sockets have
    no TCP_NODELAY, which the bump leaves to the worker's connector: compare CPU
    only).
    """
    if TWISTED_CONNECTOR:

        def twisted_connect(host, _port, factory, timeout, source_ip):
            return reactor.connectTCP("127.0.0.1", port, factory, timeout)

        return twisted_connect
    worker_connect = connect_upstream(reactor)

    def connect(host, _port, factory, timeout, source_ip):
        return worker_connect("127.0.0.1", port, factory, timeout, None)

    return connect


# Each listener's PortMetrics ("plain", "bump"): the requests it answered (--alternate).
METRICS: dict = {}


def answered(metrics) -> int:
    """The requests C{metrics} (a PortMetrics) counted so far (flushed to its counters)."""
    metrics.flush()
    return int(
        sum(
            sample.value
            for family in metrics.families.requests.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels.get("port") == metrics.port
        )
    )


def listen_plain(config: C.Config, origin_port: int) -> int:
    port = config.ports[0]
    factory = ProxyFactory(
        port,
        settings=RelaySettings(config.timeouts, config.limits, "bench"),
        connect=to(origin_port),
        clock=reactor,
        local_addresses=frozenset(),
        # As the bump port's HTTP relay (metrics are on by default in a worker):
        # the same metrics on both rows, or the bumped row pays for a count the
        # plain one skips.
        metrics=PortMetrics(port.name, port.mode),
        reactor=reactor,
    )
    METRICS["plain"] = factory.metrics
    return listen_both(factory)


def listen_both(factory) -> int:
    """
    Listen on ::1 and 127.0.0.1, the same port: C{localhost} is either.  Each
    listener accepts through the worker's own accept loop (L{serve_accepts},
    which makes the worker's transports), not Twisted's C{tcp.Port.doRead}.
    """
    ipv6 = reactor.listenTCP(0, factory, backlog=1024, interface="::1")
    port = ipv6.getHost().port
    ipv4 = reactor.listenTCP(port, factory, backlog=1024, interface="127.0.0.1")
    for listening in (ipv6, ipv4):
        serve_accepts(
            listening,
            reactor,
            room=lambda: 1 << 20,
            may_resume=lambda: True,
            on_shortage=lambda error: None,
        )
    return port


def listen_bump(config: C.Config, origin_port: int) -> int:
    kit = load_bump_kit(config, reactor, metrics=False)
    factory = tls_factory(
        config.ports[1], config, reactor, to(origin_port), frozenset(), None, None, bump=kit
    )
    METRICS["bump"] = factory.metrics
    return listen_both(factory)


def serve(at_most: float) -> None:
    """One turn of the reactor's main loop, as C{reactor.run()} does it (C{iterate(t)}
    would wait C{t} even with a call due now: every C{callLater(0)} would be late)."""
    reactor.runUntilCurrent()
    timeout = reactor.timeout()
    reactor.doIteration(at_most if timeout is None else min(timeout, at_most))


_TICK = os.sysconf("SC_CLK_TCK")


# --alternate: the steady window of each run starts this long after wrk did (its
# connections made and, bumped, handshaken) and ends this long before it stops.
STEADY_SKIP = 1.0
STEADY_TAIL = 0.5

# --pin: the CPUs wrk and nginx run on (the worker has the first one to itself).
PEERS_CPUS: set[int] = set()


def _nginx_pids(master: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(name) == master or int(stat[1]) == master:
                pids.append(int(name))
    return pids


def pin(nginx_pid: int) -> None:
    """The worker (this process) on the first allowed CPU, nginx and wrk on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    PEERS_CPUS.update(cpus[1:])
    os.sched_setaffinity(0, {cpus[0]})
    for pid in _nginx_pids(nginx_pid):
        os.sched_setaffinity(pid, PEERS_CPUS)


def nginx_usage(master: int) -> tuple[float, int]:
    """nginx's processes (C{master} and its workers): CPU seconds, voluntary context switches."""
    cpu, switches = 0.0, 0
    for pid in _nginx_pids(master):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, IndexError):
            continue  # gone meanwhile
        cpu += (int(stat[11]) + int(stat[12])) / _TICK
        switches += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
    return cpu, switches


def run_wrk(
    url: str,
    seconds: float,
    connections: int,
    close: bool,
    nginx_pid: int | None = None,
    count: Callable[[], int] | None = None,
) -> tuple[
    int, tuple[float, float], int, tuple[float, float, int], tuple[int, float, float] | None
]:
    """
    Run wrk while the reactor serves; (requests, (user, system) CPU seconds,
    errors, (nginx CPU seconds, wrk CPU seconds, nginx voluntary context
    switches), the steady window).  The steady window, with C{count} (the
    requests the proxy answered so far): from C{STEADY_SKIP} seconds after wrk
    started (its connections made, their handshakes done) to C{STEADY_TAIL}
    before it stops, (requests, user, system CPU seconds); C{None} without.
    """
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    if PEERS_CPUS:
        argv = ["taskset", "-c", ",".join(map(str, sorted(PEERS_CPUS))), *argv]
    if close:
        argv += ["-H", "Connection: close"]
    nginx_before = nginx_usage(nginx_pid) if nginx_pid else (0.0, 0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    before = resource.getrusage(resource.RUSAGE_SELF)
    opens = time.monotonic() + STEADY_SKIP
    closes = opens - STEADY_SKIP + max(1, round(seconds)) - STEADY_TAIL
    samples = []  # (requests, CPU): the steady window's first and latest
    while proc.poll() is None:
        serve(0.05)
        if count is not None and opens <= time.monotonic() <= closes:
            samples[1:] = [(count(), resource.getrusage(resource.RUSAGE_SELF))]
    after = resource.getrusage(resource.RUSAGE_SELF)
    window = None
    if count is not None:
        if len(samples) < 2:
            raise RuntimeError("wrk ran too short for a steady window (--seconds)")
        (n0, r0), (n1, r1) = samples
        window = (n1 - n0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)
    cpu = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    nginx_after = nginx_usage(nginx_pid) if nginx_pid else (0.0, 0)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, waited for by poll()
    peers = (
        nginx_after[0] - nginx_before[0],
        waited.ru_utime + waited.ru_stime - children.ru_utime - children.ru_stime,
        nginx_after[1] - nginx_before[1],
    )
    out = proc.stdout.read().decode(errors="replace")
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"wrk: {out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    # Let the last connections close before the next row.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        serve(0.05)
    return int(match.group(1)), cpu, errors, peers, window


def in_memory(handshakes: int = 300, requests: int = 20000) -> None:
    """The C{--in-memory} rows (see the module docstring)."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from twisted.internet.ssl import Certificate
    from twisted.internet.task import Clock

    from tproxy_twist.testing import FakeTransport
    from tproxy_twist.tls.ca import CertificateAuthority, create_ca
    from tproxy_twist.tls.leaf import BumpServerTLS, LeafCache
    from tproxy_twist.tls.membio import client_tls
    from tproxy_twist.tls.testing import now_utc
    from tproxy_twist.tls.verify import OriginTrust, trustRootFromCertificates

    key, certificate = create_ca("bump_cpu in-memory CA", now_utc())
    clock = Clock()
    clock.advance(now_utc().timestamp())
    server = BumpServerTLS(LeafCache(CertificateAuthority(certificate, key), 10, clock))
    pem = certificate.public_bytes(Encoding.PEM)
    trust = OriginTrust(trustRootFromCertificates([Certificate.loadPEM(pem)]))

    class App:
        transport = None
        data = b""

        def handshakeCompleted(self) -> None:
            pass

        def dataReceived(self, data: bytes) -> None:
            self.data = data

        def connectionLost(self, reason) -> None:
            pass

    class Wire(FakeTransport):
        out = b""

        def write(self, data: bytes) -> None:
            self.out += data

        def take(self) -> bytes:
            data, self.out = self.out, b""
            return data

    def pair():
        client_wire, server_wire = Wire(), Wire()
        server_wire.protocol = App()
        client = client_tls(client_wire, App(), trust.creator("bench.example"))
        end = server.start(server_wire, "bench.example", client_wire.take())
        for _ in range(5):
            for source, target in ((server_wire, client), (client_wire, end)):
                data = source.take()
                if data:
                    target.dataReceived(data)
        assert client.handshake_done and end.handshake_done
        return client, client_wire, end, server_wire

    pair()
    started = time.process_time()
    for _ in range(handshakes):
        pair()
    per_handshake = (time.process_time() - started) / handshakes * 1e3
    client, client_wire, end, server_wire = pair()
    request = b"GET /small HTTP/1.1\r\nHost: localhost\r\n" + b"x" * 560 + b"\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 513\r\n\r\n" + BODY
    started = time.process_time()
    for _ in range(requests):
        client.write(request)
        end.dataReceived(client_wire.take())
        end.write(response)
        client.dataReceived(server_wire.take())
    per_request = (time.process_time() - started) / requests * 1e6
    assert end.protocol.data == request and client.protocol.data == response
    print(f"handshake pair (full, verified, our leaf)  {per_handshake:8.3f} ms CPU")
    print(f"request + response TLS work (2 enc, 2 dec) {per_request:8.1f} us CPU")


def alternate(rounds: int, seconds: float, connections: int, nginx_pid: int, urls: dict) -> None:
    """
    The C{--alternate} rows: plain and bumped keep-alive in turns (which goes
    first alternates), each run counted over its steady window only (no
    connection set-up or handshakes in it; requests as the port's metrics
    counted them), and the ratio of their CPU per request in each round:
    two runs a few seconds apart see the same machine, where runs minutes
    apart on a shared VM differ by 20 % and more.
    """
    import statistics

    rows = [("plain", METRICS["plain"]), ("bump-keepalive", METRICS["bump"])]
    print(
        f"{'round':>5} {'row':16} {'requests':>9} {'CPU ms/request':>15} {'user':>7} {'system':>7}"
        f" errors"
    )
    ratios = []
    totals = {name: [0, 0.0] for name, _ in rows}
    for turn in range(1, rounds + 1):
        cpu_per = {}
        for name, metrics in rows if turn % 2 else rows[::-1]:
            *_, errors, _, (n, user, system) = run_wrk(
                urls[name][0], seconds, connections, False, nginx_pid, partial(answered, metrics)
            )
            per = 1e3 / max(n, 1)
            cpu_per[name] = (user + system) * per
            totals[name][0] += n
            totals[name][1] += user + system
            print(
                f"{turn:5d} {name:16} {n:9d} {cpu_per[name]:15.3f} {user * per:7.3f}"
                f" {system * per:7.3f} {errors:6d}",
                flush=True,
            )
        ratios.append(cpu_per["plain"] / cpu_per["bump-keepalive"])
        print(f"{turn:5d} plain / bumped CPU per request: {ratios[-1]:.3f}", flush=True)
    overall = {name: cpu / max(n, 1) for name, (n, cpu) in totals.items()}
    plain, bumped = overall["plain"], overall["bump-keepalive"]
    print(
        f"bumped keep-alive / plain relay, {rounds} rounds of {connections} connections:"
        f" median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f});"
        f" all rounds' CPU per request {plain * 1e3:.3f} / {bumped * 1e3:.3f} ms"
        f" = {plain / bumped:.3f}"
    )


def _gc_stats() -> list:
    """
    Count the cyclic GC's collections, their CPU time and the objects they
    freed from now on: [collections, CPU seconds, the start of the one
    running, objects collected] (gc.callbacks).
    """
    import gc

    stats = [0, 0.0, 0.0, 0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            stats[2] = time.process_time()
        else:
            stats[0] += 1
            stats[1] += time.process_time() - stats[2]
            stats[3] += info["collected"]

    gc.callbacks.append(callback)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bump_cpu")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--only", default="plain,bump-keepalive,bump-new")  # or plain-new
    parser.add_argument("--profile", help="write DIR/<row>.prof (cProfile) for each row")
    parser.add_argument(
        "--no-resumption",
        action="store_true",
        help="the origin resumes no TLS session (as bench/tls.py's): every origin handshake full",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after the warm-up: the cyclic GC skips everything made before",
    )
    parser.add_argument(
        "--gc-stats",
        action="store_true",
        help="also print the cyclic GC's collections and CPU per request (gc.callbacks)",
    )
    parser.add_argument(
        "--twisted-connector",
        action="store_true",
        help="upstream connections through Twisted's connectTCP, not the worker's connector",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the worker on a CPU of its own, wrk and nginx on the others (as on a router,"
        " where clients and origins are other machines)",
    )
    parser.add_argument(
        "--alternate",
        type=int,
        metavar="ROUNDS",
        help="plain and bumped keep-alive in turns, ROUNDS each, counted over each run's"
        " steady window: their CPU ratio per round and its median",
    )
    parser.add_argument(
        "--in-memory",
        action="store_true",
        help="only the bump's TLS in memory: CPU per handshake pair and per request's TLS work",
    )
    opts = parser.parse_args(argv)
    global TWISTED_CONNECTOR
    TWISTED_CONNECTOR = opts.twisted_connector
    if opts.in_memory:
        in_memory()
        return 0
    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        print("needs wrk and nginx (apt install wrk nginx)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bump_cpu."))
    nginx = None
    try:
        nginx, https, http, config = setup(tmp, resumable=not opts.no_resumption)
        if opts.pin:
            pin(nginx.pid)
        plain = listen_plain(config, http)
        bump = listen_bump(config, https)
        rows = {
            "plain": (f"http://localhost:{plain}/small", False),
            "plain-new": (f"http://localhost:{plain}/small", True),
            "bump-keepalive": (f"https://localhost:{bump}/small", False),
            "bump-new": (f"https://localhost:{bump}/small", True),
        }
        # Warm up: the leaf is forged once, the code paths are loaded.
        run_wrk(rows["bump-new"][0], 1, 4, True)
        if opts.alternate:
            alternate(opts.alternate, opts.seconds, opts.connections, nginx.pid, rows)
            return 0
        if opts.gc_freeze:
            import gc

            gc.collect()
            gc.freeze()
        gc_time = _gc_stats() if opts.gc_stats else None
        print(
            f"{'row':16} {'requests':>9} {'CPU ms/request':>15} {'user':>7} {'system':>7}"
            f" {'req/s (noise)':>14} errors  {'nginx':>6} {'wrk':>6} {'nginx sleeps/req':>16}"
            + ("  GC/request: collections, ms CPU, objects freed" if gc_time else "")
        )
        for name in opts.only.split(","):
            url, close = rows[name]
            profiler = cProfile.Profile(time.process_time) if opts.profile else None
            if profiler is not None:
                profiler.enable()
            started = time.monotonic()
            if gc_time is not None:
                gc_time[:] = [0, 0.0, 0.0, 0]
            requests, cpu, errors, peers, _ = run_wrk(
                url, opts.seconds, opts.connections, close, nginx.pid
            )
            elapsed = time.monotonic() - started - 2
            if profiler is not None:
                profiler.disable()
                os.makedirs(opts.profile, exist_ok=True)
                profiler.dump_stats(os.path.join(opts.profile, f"{name}.prof"))
            per = 1e3 / max(requests, 1)
            print(
                f"{name:16} {requests:9d} {(cpu[0] + cpu[1]) * per:15.3f} {cpu[0] * per:7.3f}"
                f" {cpu[1] * per:7.3f} {requests / elapsed:14.0f} {errors:6d}"
                f"  {peers[0] * per:6.3f} {peers[1] * per:6.3f} {peers[2] / max(requests, 1):16.2f}"
                + (
                    f"  {gc_time[0] / max(requests, 1):.3f} {gc_time[1] * per:.3f}"
                    f" {gc_time[3] / max(requests, 1):.1f}"
                    if gc_time is not None
                    else ""
                )
            )
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
