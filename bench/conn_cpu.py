"""
The worker's own cost of a new connection, in one process on loopback: CPU time, or
instructions under callgrind. Deterministic enough for A/B comparisons on a busy machine.

    PYTHONPATH=. .venv/bin/python -m bench.conn_cpu [--kind http|tls|tls-exchange] [--connections N]
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python -m bench.conn_cpu --kind http --connections N   # twice, N and 2N

This process runs a worker's relay on the worker reactor (metrics on, the
real upstream connector); a client process opens N connections (8 at a
time) and an origin process answers, both outside this process (so neither
is counted). Per connection the worker accepts, reads, connects upstream,
relays, and closes both sides:

- ``http``: a forward port (loopback has no TPROXY; the relay's path is the
  same apart from the spoofing bind): ``GET http://127.0.0.1:PORT/small``
  with ``Connection: close``, a 3-byte answer.
- ``tls``: a TLS port's splice path: the client sends a real ClientHello
  (made by Python's ssl, SNI ``origin.test``) and reads until EOF; the origin
  reads the hello, sends 4 KB (a server's first flight) and closes. The
  destination, which a tproxy port takes from the accepted socket's local
  address, is set to the origin's address (the only bench-side shim).
- ``tls-exchange``: ``tls``, then what a real handshake and one request add:
  once the 4 KB flight is in, the client sends 150 bytes (its Finished and
  the request), the origin answers 800 bytes (session tickets and the
  response) and closes first, as nginx does after ``Connection: close``.

- ``bump``: a TLS port that bumps every connection (the real bump kit, a CA
  made with ``tproxy-twist ca init``): the client (Python's ssl, as wrk
  the system's OpenSSL, trusting that CA) makes a real TLS handshake with
  SNI ``localhost`` and sends ``GET /small`` with ``Connection: close``; the
  origin (Python's ssl, a certificate for ``localhost`` from a CA of its own,
  session tickets on, as nginx's) answers ``ok`` and closes. Per connection
  the worker verifies the origin (resuming its session from the second
  connection on), forges for the name (cached leaf), handshakes with the
  client and relays the exchange: what ``bench.bump_cpu``'s ``bump-new`` row
  measures in wall-clock CPU, here in instructions under callgrind.

Printed: this process's CPU time (``time.process_time``) per connection
while the N connections are served (warm-up excluded). Under callgrind,
subtract two runs (N and 2N connections) to get instructions per connection
without start-up.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

from prometheus_client import CollectorRegistry

from tproxy_twist import config as C
from tproxy_twist import sockets
from tproxy_twist.metrics import PortMetrics, StreamMetrics, TLSPortMetrics
from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.sockets import connect_upstream, serve_accepts
from tproxy_twist.testing import loopback_forward_factory

ORIGIN = r"""
import asyncio, sys
kind = sys.argv[1]
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
FLIGHT = b"\x16\x03\x03" + b"s" * 4093
FINISHED_AND_REQUEST, ANSWER_SIZE = 150, 800
async def serve(reader, writer):
    try:
        if kind in ("http", "bump"):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ANSWER)
        else:
            await reader.read(65536)
            writer.write(FLIGHT)
            if kind == "tls-exchange":
                # The client's Finished and its request; then the session tickets and
                # the response, and the origin closes (as nginx after Connection: close).
                await writer.drain()
                await reader.readexactly(FINISHED_AND_REQUEST)
                writer.write(b"\x17\x03\x03" + b"r" * (ANSWER_SIZE - 3))
        await writer.drain()
    except Exception:
        pass
    writer.close()
async def main():
    tls = None
    if kind == "bump":  # TLS with the certificate given, session tickets on (as nginx)
        import ssl
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(sys.argv[2], sys.argv[3])
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096, ssl=tls)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

CLIENT = r"""
import socket, ssl, sys, threading
port, n, concurrency = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
payload = bytes.fromhex(sys.argv[4])
exchange = sys.argv[5] == "tls-exchange"
bump = ssl.create_default_context(cafile=sys.argv[6]) if sys.argv[5] == "bump" else None
lock = threading.Lock()
left = [n]
bad = [0]
def run():
    while True:
        with lock:
            if not left[0]:
                return
            left[0] -= 1
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            if bump is not None:
                s = bump.wrap_socket(s, server_hostname="localhost")
            s.sendall(payload)
            got = b""
            sent_request = False
            while True:
                try:
                    chunk = s.recv(65536)
                except ssl.SSLEOFError:  # closed without close_notify
                    chunk = b""
                if not chunk:
                    break
                got += chunk
                if exchange and not sent_request and len(got) >= 4096:
                    s.sendall(b"\x17\x03\x03" + b"q" * 147)  # Finished and the request
                    sent_request = True
            s.close()
            # TLS: the origin's 4 KB flight (and its 800-byte answer); HTTP: a 200 answer
            if payload[:1] == b"\x16":
                ok = len(got) == (4896 if exchange else 4096)
            else:
                ok = got.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        if not ok:
            with lock:
                bad[0] += 1
threads = [threading.Thread(target=run) for _ in range(concurrency)]
for t in threads: t.start()
for t in threads: t.join()
print(bad[0], flush=True)
"""


def client_hello() -> bytes:
    """A real ClientHello, as Python's ssl makes it, with an SNI."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="origin.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def http_factory(reactor, origin_port: int):
    factory = loopback_forward_factory(reactor, origin_port, pseudonym="bench")
    payload = (
        f"GET http://127.0.0.1:{origin_port}/small HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n"
        "User-Agent: bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode()
    return factory, payload


def tls_factory(reactor, origin_port: int, stream_relay: str = "copy"):
    from tproxy_twist.tls.layer import TLSConnection, TLSFactory

    config = C.loads(
        '[[port]]\nname = "tls"\nlisten = "127.0.0.1:3129"\nmode = "tproxy"\nprotocol = "tls"\n'
        f'stream_relay = "{stream_relay}"\n'
    )
    port = config.ports[0]

    class LoopbackTLSConnection(TLSConnection):
        def connectionMade(self):
            super().connectionMade()
            # Loopback has no TPROXY: the original destination is the origin.
            self.destination = ("127.0.0.1", origin_port)

    class Factory(TLSFactory):
        def buildProtocol(self, addr):
            if self._sweeper is None:
                super().buildProtocol(addr)  # starts the sweeper (its protocol is dropped)
            return LoopbackTLSConnection(self)

    registry = CollectorRegistry()
    # The raw upstream socket, as tls_factory gives the worker's ports (a tree
    # from before it, for an A/B run with this tool, has no such parameter).
    lean = {}
    if "open_upstream" in inspect.signature(TLSFactory.__init__).parameters:
        lean["open_upstream"] = sockets.open_upstream
    factory = Factory(
        port,
        timeouts=config.timeouts,
        connect=connect_upstream(reactor),
        clock=reactor,
        local_addresses=frozenset(),
        metrics=PortMetrics("tls", "tproxy", registry),
        tls_metrics=TLSPortMetrics("tls"),
        stream_metrics=StreamMetrics("tls"),
        reactor=reactor,
        **lean,
    )
    return factory, client_hello()


BUMP_CONFIG = """\
[tls]
ca_cert = "{tmp}/proxy-ca/ca.pem"
ca_key = "{tmp}/proxy-ca/ca.key"
ca_bundle = "{tmp}/origin-ca.pem"

[[port]]
name = "bump"
listen = "127.0.0.1:3129"
mode = "tproxy"
protocol = "tls"
[port.tls]
default = "bump"
"""


def bump_files(tmp: str) -> tuple[str, str]:
    """The origin's CA and certificate (for C{localhost}), and the proxy's CA, in C{tmp}."""
    from tproxy_twist.tls.testing import make_ca, make_server_cert

    origin_ca = make_ca("conn_cpu origin CA")
    origin = make_server_cert(["localhost"], origin_ca)
    for name, data in (("origin-ca.pem", origin_ca.cert_pem), ("origin.pem", origin.cert_pem),
                       ("origin.key", origin.key_pem)):  # fmt: skip
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    subprocess.run(
        [sys.executable, "-m", "tproxy_twist.cli", "ca", "init", "--dir", f"{tmp}/proxy-ca",
         "--name", "conn_cpu proxy CA"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return os.path.join(tmp, "origin.pem"), os.path.join(tmp, "origin.key")


def bump_factory(reactor, origin_port: int, tmp: str):
    """A TLS port bumping every connection, its upstream connections sent to the origin."""
    from tproxy_twist.tls.bumpkit import load_bump_kit
    from tproxy_twist.tls.layer import tls_factory as make_tls_factory

    config = C.loads(BUMP_CONFIG.format(tmp=tmp), os.path.join(tmp, "bench.toml"))
    kit = load_bump_kit(config, reactor, metrics=False)
    worker_connect = connect_upstream(reactor)

    def connect(host, _port, factory, timeout, source_ip):
        # Loopback has no TPROXY: the original destination (the listener) is the origin.
        return worker_connect("127.0.0.1", origin_port, factory, timeout, None)

    factory = make_tls_factory(
        config.ports[0], config, reactor, connect, frozenset(), None, None, bump=kit
    )
    payload = b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    return factory, payload


def serve(
    reactor, port: int, payload: bytes, n: int, concurrency: int, kind: str, cafile: str = "-"
) -> float:
    """Run the reactor while a client makes N connections; return this process's CPU seconds."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port), str(n), str(concurrency), payload.hex(), kind,
         cafile],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    started = time.process_time()
    while client.poll() is None:
        reactor.iterate(0.01)
    used = time.process_time() - started
    bad = int(client.stdout.read())
    if bad:
        raise SystemExit(f"{bad} of {n} connections failed")
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conn_cpu")
    parser.add_argument("--kind", choices=("http", "tls", "tls-exchange", "bump"), default="http")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--stream-relay",
        choices=("copy", "splice"),
        default="copy",
        help="tls kinds: the port's stream_relay (copy, the default, or splice)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once set up: what a worker that freezes its start-up heap would spend",
    )
    opts = parser.parse_args(argv)
    reactor = WorkerReactor()
    tmp = tempfile.mkdtemp(prefix="conn_cpu-")
    origin_args, cafile = [], "-"
    if opts.kind == "bump":
        origin_args = list(bump_files(tmp))
        cafile = os.path.join(tmp, "proxy-ca", "ca.pem")
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, opts.kind, *origin_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        origin_port = int(origin.stdout.readline())
        if opts.kind == "http":
            factory, payload = http_factory(reactor, origin_port)
        elif opts.kind == "bump":
            factory, payload = bump_factory(reactor, origin_port, tmp)
        else:
            factory, payload = tls_factory(reactor, origin_port, opts.stream_relay)
        listener = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
        if not os.environ.get("TWISTED_ACCEPT"):  # A/B: Twisted's own accept loop
            # The worker's accept loop (worker._accept_within_budget).
            serve_accepts(
                listener, reactor, room=lambda: 1 << 30, may_resume=lambda: True, on_shortage=print
            )
        port = listener.getHost().port
        serve(reactor, port, payload, opts.warmup, opts.concurrency, opts.kind, cafile)
        if opts.gc_freeze:
            gc.collect()
            gc.freeze()
        used = serve(reactor, port, payload, opts.connections, opts.concurrency, opts.kind, cafile)
        print(
            f"{opts.kind}: {used / opts.connections * 1e6:.1f} us of CPU per connection"
            f" ({opts.connections} connections, {opts.concurrency} at a time)"
        )
    finally:
        origin.kill()
        origin.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
