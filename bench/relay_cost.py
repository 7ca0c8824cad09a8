"""
The relay's own Python per exchange, without sockets: instructions or CPU.

    PYTHONPATH=. .venv/bin/python -m bench.relay_cost [-n N]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null ... (see bench/README.md)

A port's real L{ProxyFactory} (a C{tproxy} port, defaults, metrics on a
registry of its own, watched by the status page's problem log as the worker
does) relays N keep-alive exchanges, a browser-like GET and a small 200,
over fake transports (L{tproxy_twist.testing}) and a fake clock: what the
request path costs in Python, with no system call, reactor or timer in it.
Prints CPU microseconds per exchange (best of five rounds).  For
instructions, run it under callgrind twice (C{-n 2000} and C{-n 4000}) and
divide the difference of the totals by 2000: nothing in it depends on time,
so the count is the same on every run.
"""

from __future__ import annotations

import argparse
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


def relay(n: int) -> float:
    """CPU seconds for N keep-alive exchanges on one client connection."""
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
    client.dataReceived(REQUEST)
    upstream = connect.attempts[-1]
    upstream.succeed()
    server = upstream.protocol
    upstream_transport = upstream.transport
    server.dataReceived(RESPONSE)
    if not transport.value().startswith(b"HTTP/1.1 200 OK\r\n"):
        raise SystemExit(f"no answer: {transport.value()[:300]!r}")
    transport.clear()
    upstream_transport.clear()
    started = time.process_time()
    for _ in range(n):
        client.dataReceived(REQUEST)
        server.dataReceived(RESPONSE)
        transport.clear()
        upstream_transport.clear()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_cost")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)
    best = min(relay(opts.n) for _ in range(opts.rounds))
    print(f"{best / opts.n * 1e6:.2f} us CPU per keep-alive exchange (best of {opts.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
