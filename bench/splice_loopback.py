"""
Zero-copy against copying, on loopback, in one process: how fast and at
what CPU cost the worker reactor relays 1 GB between two TCP connections.

    PYTHONPATH=. .venv/bin/python -m bench.splice_loopback [--mb 1024] [--rounds 3]

Three ways, alternating: C{splice} (L{SplicePump}), C{copy} (the same pump
through a user-space buffer: its fallback) and C{twisted} (each transport the
other's producer, bytes through C{dataReceived} and C{write}: how TLS
passthrough and tunnels were relayed before the pump). A sender and a
receiver thread stand in for the client and the origin; the figure that
matters is the reactor thread's own CPU time per GB, which the rest of the
machine's load does not change much.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import threading
import time

from twisted.internet.protocol import Factory, Protocol

from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.zerocopy import PipePool, SplicePump


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.append(self)


def one(way: str, size: int) -> tuple[float, float]:
    """(MB/s, reactor CPU seconds per GB) for one transfer of C{size} bytes."""
    reactor = WorkerReactor()
    factory = Factory.forProtocol(_Accepted)
    factory.accepted = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    peers = []
    for _ in range(2):
        peers.append(socket.create_connection(("127.0.0.1", port.getHost().port)))
        while len(factory.accepted) < len(peers):
            reactor.iterate(0.01)
    (a, b), (pa, pb) = factory.accepted, peers
    if way == "twisted":
        a.dataReceived = b.transport.write
        b.dataReceived = a.transport.write
        a.transport.bufferSize = b.transport.bufferSize = 1 << 18  # as the relay reads
        a.transport.registerProducer(b.transport, True)
        b.transport.registerProducer(a.transport, True)
    else:
        pump = SplicePump(
            a.transport,
            b.transport,
            reactor=reactor,
            clock=reactor,
            on_end=lambda reason: None,
            pool=PipePool(),
            copy=way == "copy",
        )
        pump.start()
    chunk = os.urandom(1 << 20)
    done = threading.Event()

    def send() -> None:
        for _ in range(size // len(chunk)):
            pa.sendall(chunk)

    def receive() -> None:
        got = 0
        while got < size:
            got += len(pb.recv(1 << 20))
        done.set()

    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_THREAD)
    threading.Thread(target=send, daemon=True).start()
    threading.Thread(target=receive, daemon=True).start()
    while not done.is_set():
        reactor.iterate(0.01)
    after = resource.getrusage(resource.RUSAGE_THREAD)
    seconds = time.monotonic() - started
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    for sock in peers:
        sock.close()
    for protocol in (a, b):
        protocol.transport.abortConnection()
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0)
    return size / seconds / 1e6, cpu / (size / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.splice_loopback")
    parser.add_argument("--mb", type=int, default=1024, help="MiB per transfer")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)
    size = opts.mb << 20
    figures: dict[str, list[tuple[float, float]]] = {"splice": [], "copy": [], "twisted": []}
    for _ in range(opts.rounds):
        for way in figures:
            figures[way].append(one(way, size))
    print(f"{opts.mb} MiB over loopback, {opts.rounds} rounds alternating, median (min-max):")
    for way, runs in figures.items():
        rates = [r for r, _ in runs]
        cpus = [c for _, c in runs]
        print(
            f"  {way:8} {statistics.median(rates):6.0f} MB/s ({min(rates):.0f}-{max(rates):.0f})"
            f"   reactor CPU {statistics.median(cpus):.2f} s/GB ({min(cpus):.2f}-{max(cpus):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
