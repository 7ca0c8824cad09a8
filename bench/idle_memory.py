"""
What one idle keep-alive connection costs a worker, object by object.

    PYTHONPATH=. .venv/bin/python -m bench.idle_memory [--connections N]

In one process, on loopback, no namespaces: a tiny keep-alive origin, a
worker's relay (``ProxyFactory`` on a forward port, the worker reactor,
the real upstream connector, metrics on), and N clients that each send one
request, read the answer and stay connected: each client connection and its
pinned upstream connection are parked, as in ``bench/run``'s memory column.
tracemalloc compares the heap before and after the N connections; the
Python objects alive per connection are counted by type. Kernel socket
buffers are not Python memory and are not in these figures (they are in
the RSS that ``bench/run`` measures).
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.testing import loopback_forward_factory

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    opts = parser.parse_args(argv)

    reactor = WorkerReactor()
    # The origin runs in its own process: its connections are not ours to count.
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        origin_port = int(origin.stdout.readline())
        return measure(reactor, origin_port, opts)
    finally:
        origin.kill()
        origin.wait()


ORIGIN = """
import asyncio, sys
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n"
async def serve(reader, writer):
    while True:
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(ANSWER)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def measure(reactor, origin_port: int, opts) -> int:
    factory = loopback_forward_factory(reactor, origin_port, pseudonym="bench")
    proxy = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
    proxy_port = proxy.getHost().port
    request = (
        f"GET http://127.0.0.1:{origin_port}/small HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n"
        "User-Agent: bench\r\nAccept: */*\r\n\r\n"
    ).encode()

    def park_batch(n: int) -> list[socket.socket]:
        clients = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", proxy_port))
            s.setblocking(False)
            s.sendall(request)
            clients.append(s)
        waiting = list(clients)
        deadline = time.monotonic() + 60
        got = {s: b"" for s in clients}
        while waiting and time.monotonic() < deadline:
            reactor.iterate(0.002)
            still = []
            for s in waiting:
                try:
                    got[s] += s.recv(4096)
                except BlockingIOError:
                    pass
                (still if not got[s].endswith(b"ok\n") else []).append(s)
            waiting = still
        if waiting:
            raise SystemExit(f"{len(waiting)} of {n} clients got no answer")
        return clients

    def park(n: int) -> list[socket.socket]:
        clients = []
        while len(clients) < n:
            clients += park_batch(min(100, n - len(clients)))
        for _ in range(50):
            reactor.iterate(0.001)
        return clients

    park(50)  # warm: imports, caches, the metrics' children, the sweeper
    gc.collect()
    tracemalloc.start(8)
    before_snapshot = tracemalloc.take_snapshot()
    before_types = Counter(type(o).__name__ for o in gc.get_objects())
    clients = park(opts.connections)
    gc.collect()
    after_snapshot = tracemalloc.take_snapshot()
    after_types = Counter(type(o).__name__ for o in gc.get_objects())
    n = opts.connections
    held = len(factory.connections)

    stats = after_snapshot.compare_to(before_snapshot, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{n} idle keep-alive connections ({held} held by the relay), each with its upstream")
    print(f"Python heap growth: {total / n:,.0f} bytes per connection (tracemalloc)\n")
    print("by allocation site (bytes per connection):")
    for stat in stats[: opts.top]:
        if stat.size_diff <= 0:
            continue
        frame = stat.traceback[0]
        where = f"{frame.filename.split('site-packages/')[-1].split('/work/')[-1]}:{frame.lineno}"
        print(f"  {stat.size_diff / n:8.0f}  {stat.count_diff / n:5.1f} blocks  {where}")
    print("\nobjects (gc-tracked) per connection, by type:")
    grown = {t: after_types[t] - before_types.get(t, 0) for t in after_types}
    for name, count in sorted(grown.items(), key=lambda kv: -kv[1])[: opts.top]:
        if count / n >= 0.5:
            print(f"  {count / n:6.2f}  {name}")
    for s in clients:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
