"""
The relay's own Python per exchange, without sockets: instructions or CPU.

    PYTHONPATH=. .venv/bin/python -m bench.relay_cost [-n N] [--heads H]
    PYTHONPATH=. .venv/bin/python -m bench.relay_cost --callgrind [--heads H]
    PYTHONPATH=/work/ab-x .venv/bin/python bench/relay_cost.py ...   (another tree's relay)

A port's real L{ProxyFactory} (a C{tproxy} port, defaults, metrics on a
registry of its own, watched by the status page's problem log as the worker
does) relays N keep-alive exchanges, a browser-like GET and a small 200,
over fake transports (L{tproxy_twist.testing}) and a fake clock: what the
request path costs in Python, with no system call, reactor or timer in it.
Prints CPU microseconds per exchange (best of five rounds).  For
instructions, run it under callgrind twice (C{-n 2000} and C{-n 4000}) and
divide the difference of the totals by 2000: nothing in it depends on time,
so the count is the same on every run: C{--callgrind} does that (with
C{PYTHONHASHSEED=0}) and prints instructions per exchange.

C{--heads}: C{firefox} (the default) a Firefox-like GET without a
Connection field and nginx's answer without one; C{small} the 4-line
request and 3-line answer of C{bench.exchange_cost}'s default; C{browser}
what C{bench.exchange_cost --heads browser} sends: Firefox's head and
nginx's answer, both with C{Connection: keep-alive}.  Self-contained
(imports nothing from bench/) so that another checkout's relay can be
measured with this file.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry
from twisted.internet import task

from tproxy_twist import config as C
from tproxy_twist.http.relay import ProxyFactory, RelaySettings
from tproxy_twist.metrics import PortMetrics
from tproxy_twist.status.problems import ProblemLog, watch_factory
from tproxy_twist.testing import FakeConnect, FakeTransport, tcp_address

REQUEST = (
    b"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: 203.0.113.2\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Referer: http://203.0.113.2/\r\nCookie: session=0123456789abcdef\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/javascript\r\nContent-Length: 3\r\n"
    b'Last-Modified: Mon, 30 Nov 2026 11:00:00 GMT\r\nETag: "5f-3"\r\n'
    b"Accept-Ranges: bytes\r\n\r\nok\n"
)
SMALL_REQUEST = (
    b"GET /small HTTP/1.1\r\nHost: 203.0.113.2\r\nUser-Agent: exchange-cost\r\nAccept: */*\r\n\r\n"
)
SMALL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
BROWSER_REQUEST = (
    b"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: 203.0.113.2\r\nUser-Agent: Mozilla/5.0 (X11;"
    b" Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\nAccept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nReferer: http://203.0.113.2/\r\n\r\n"
)
BROWSER_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/javascript\r\nContent-Length: 3\r\n"
    b"Last-Modified: Mon, 30 Nov 2026 11:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "5f-3"\r\nAccept-Ranges: bytes\r\n\r\nok\n'
)
HEADS = {
    "firefox": (REQUEST, RESPONSE),
    "small": (SMALL_REQUEST, SMALL_RESPONSE),
    "browser": (BROWSER_REQUEST, BROWSER_RESPONSE),
}


def relay(n: int, heads: str = "firefox") -> float:
    """CPU seconds for N keep-alive exchanges on one client connection."""
    request, response = HEADS[heads]
    config = C.loads('[[port]]\nname = "t"\nlisten = "0.0.0.0:3129"\nmode = "tproxy"\n')
    port = config.ports[0]
    clock = task.Clock()
    connect = FakeConnect()
    factory = ProxyFactory(
        port,
        settings=RelaySettings(config.timeouts, config.limits, "router"),
        connect=connect,
        clock=clock,
        local_addresses=frozenset(),
        metrics=PortMetrics("t", "tproxy", CollectorRegistry()),
        reactor=clock,
    )
    watch_factory(factory, "t", clock, ProblemLog().add)
    client = factory.buildProtocol(None)
    transport = FakeTransport(
        host=tcp_address("203.0.113.2", 80), peer=tcp_address("198.51.100.2", 40000)
    )
    client.makeConnection(transport)
    client.dataReceived(request)
    upstream = connect.attempts[-1]
    upstream.succeed()
    server = upstream.protocol
    upstream_transport = upstream.transport
    server.dataReceived(response)
    if not transport.value().startswith(b"HTTP/1.1 200 OK\r\n"):
        raise SystemExit(f"no answer: {transport.value()[:300]!r}")
    transport.clear()
    upstream_transport.clear()
    started = time.process_time()
    for _ in range(n):
        client.dataReceived(request)
        server.dataReceived(response)
        transport.clear()
        upstream_transport.clear()
    return time.process_time() - started


def _callgrind_total(n: int, heads: str) -> int:
    """Instructions of one run of C{n} exchanges under callgrind (whole process)."""
    done = subprocess.run(
        [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, os.path.abspath(__file__), "-n", str(n), "--rounds", "1",
            "--heads", heads,
        ],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or found is None:
        raise SystemExit(f"callgrind: {done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_cost")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", choices=sorted(HEADS), default="firefox")
    parser.add_argument(
        "--callgrind", action="store_true", help="instructions per exchange (runs N and 3N)"
    )
    opts = parser.parse_args(argv)
    if opts.callgrind:
        n = opts.n if opts.n != 20000 else 1000
        extra = _callgrind_total(3 * n, opts.heads) - _callgrind_total(n, opts.heads)
        print(f"{extra / (2 * n):,.0f} instructions per keep-alive exchange ({opts.heads} heads)")
        return 0
    best = min(relay(opts.n, opts.heads) for _ in range(opts.rounds))
    print(f"{best / opts.n * 1e6:.2f} us CPU per keep-alive exchange (best of {opts.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
