"""
The bump's own cost per keep-alive exchange and per new bumped connection,
without sockets: CPU time, or (under callgrind) instructions, exact.

    PYTHONPATH=. .venv/bin/python -m bench.bump_cost [-n N] [--rounds R]
    PYTHONPATH=. .venv/bin/python -m bench.bump_cost --callgrind [-n N]
    PYTHONPATH=/work/ab-x .venv/bin/python bench/bump_cost.py ...   (another tree's proxy)

A bumping TLS port's real factory (L{tls_factory}: metrics on, the real
bump kit with a CA made here, origins verified against a second CA made
here) on fake transports and a fake clock.  Its two peers are real TLS
too, driven over memory BIOs in this process: a client (trusting the
proxy's CA, SNI and Host C{bench.example}, ALPN http/1.1) and an origin
(a certificate for C{bench.example} from the origin CA, answering every
request with a small 200).  Rows:

  - C{plain}: the same exchange through a C{tproxy} port's HTTP relay
    (plain bytes: what bench/relay_cost.py measures);
  - C{bump}: the exchange through a bumped connection (decrypt the request,
    the HTTP session, encrypt it to the origin, decrypt the response,
    encrypt it to the client), less C{direct}: the two peers' own TLS work,
    measured alone (the client and the origin talking to each other);
  - C{bump-plain}: what the bump adds to a plain exchange;
  - C{new}: a new bumped connection (hello, origin handshake and
    verification, our leaf's handshake, one exchange, the client's close),
    less C{direct-new} (the peers' handshake with each other and the same
    exchange); C{--no-resumption}: the origin resumes no session, as
    bench/tls.py's nginx (default: it does, as bench/bump_cpu.py's).

Printed: CPU microseconds (best of C{--rounds}).  C{--callgrind} runs each
row under C{valgrind --tool=callgrind} twice (C{N} and C{2N} exchanges,
C{N/10} and C{N/5} connections) and prints the difference of the two
totals per exchange: instructions in user space (cyclic GC runs included),
with C{PYTHONHASHSEED=0} so that dict and set layouts repeat too (without
it the plain row moved by 4% between runs; a handshake's random values
still move the connection rows by a per cent or two).  Self-contained
(imports nothing from bench/) so that another checkout's proxy can be
measured with this file.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REQUEST = (
    b"GET /assets/app.js?v=3 HTTP/1.1\r\nHost: bench.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Referer: https://bench.example/\r\nCookie: session=0123456789abcdef\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/javascript\r\nContent-Length: 3\r\n"
    b'Last-Modified: Mon, 30 Nov 2026 11:00:00 GMT\r\nETag: "5f-3"\r\n'
    b"Accept-Ranges: bytes\r\n\r\nok\n"
)
NAME = "bench.example"
ORIGIN = ("203.0.113.2", 443)
CLIENT = ("198.51.100.2", 40000)
ROWS = ("plain", "direct", "bump", "direct-new", "new")


class _World:
    """The proxy, its peers' TLS contexts and the fake clock: made once per process."""

    def __init__(self, resumption: bool) -> None:
        import datetime

        from cryptography.hazmat.primitives.serialization import Encoding
        from OpenSSL import SSL, crypto
        from twisted.internet import task
        from twisted.internet.ssl import Certificate

        from tproxy_twist import config as C
        from tproxy_twist.testing import FakeConnect, FakeTransport
        from tproxy_twist.tls import verify
        from tproxy_twist.tls.bumpkit import BumpKit
        from tproxy_twist.tls.ca import CertificateAuthority, create_ca
        from tproxy_twist.tls.layer import tls_factory
        from tproxy_twist.tls.leaf import BumpServerTLS, LeafCache
        from tproxy_twist.tls.pinning import PinnedHosts
        from tproxy_twist.tls.testing import make_ca, make_server_cert
        from tproxy_twist.tls.verify import OriginTrust, trustRootFromCertificates

        now = datetime.datetime.now(datetime.UTC)
        self.clock = clock = task.Clock()
        clock.advance(now.timestamp())
        key, certificate = create_ca("bump_cost proxy CA", now)
        ca = CertificateAuthority(certificate, key)
        origin_ca = make_ca("bump_cost origin CA")
        origin = make_server_cert([NAME], origin_ca)

        def trust(pem: bytes):
            return trustRootFromCertificates([Certificate.loadPEM(pem)])

        leaves = LeafCache(ca, 10, clock)
        kit = BumpKit(
            ca=ca,
            leaves=leaves,
            server=BumpServerTLS(leaves),
            origins=OriginTrust(trust(origin_ca.cert_pem), clock=clock),
            pinned=PinnedHosts(0),
            on_verify_failure="splice",
        )
        config = C.loads(
            '[[port]]\nname = "bump"\nlisten = "0.0.0.0:3130"\nmode = "tproxy"\n'
            'protocol = "tls"\n[port.tls]\ndefault = "bump"\n'
            '[[port]]\nname = "plain"\nlisten = "0.0.0.0:3129"\nmode = "tproxy"\n'
        )
        self.config = config
        self.connect = FakeConnect()
        self.factory = tls_factory(
            config.ports[0], config, clock, self.connect, frozenset(), None, None, bump=kit
        )
        # The proxy's peers: a client that trusts the proxy's CA, an origin with its
        # certificate (its session cache and tickets on or off).
        self.client_creator = OriginTrust(trust(certificate.public_bytes(Encoding.PEM))).creator(
            NAME
        )
        # The peers' own handshake (the C{direct} rows): a client that trusts the
        # origin's CA and resumes the last session, as the proxy does.
        self.direct_creator = _Resuming(OriginTrust(trust(origin_ca.cert_pem)).creator(NAME))
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(crypto.X509.from_cryptography(origin.certificate))
        context.use_privatekey(crypto.PKey.from_cryptography_key(origin.key))
        context.set_alpn_select_callback(lambda connection, offered: b"http/1.1")
        if resumption:
            context.set_session_id(b"bump_cost")
        else:
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            context.set_options(SSL.OP_NO_TICKET)
        self.origin_context = context

        class Wire(FakeTransport):
            """A fake TCP transport whose bytes the pump moves to the other end."""

        self.Wire = Wire
        # The origin side's MemoryTLS is made for TCP transports only (verify.py):
        # the fakes stand in for one here.
        verify.tcp = type("tcp", (), {"Connection": Wire})
        self._SSL = SSL

    def origin_peer(self, wire):
        """The origin's TLS on C{wire}: answers every request with RESPONSE."""
        from tproxy_twist.tls.membio import server_tls

        class Origin:
            transport = None

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(RESPONSE)

            def connectionLost(self, reason) -> None:
                pass

        wire.protocol = Origin()
        connection = self._SSL.Connection(self.origin_context, None)
        connection.set_accept_state()
        return server_tls(wire, connection)


class _Resuming:
    """A client connection creator that offers the session of the last connection."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.session = None

    def clientConnectionForTLS(self, tls):
        connection = self._inner.clientConnectionForTLS(tls)
        if self.session is not None:
            connection.set_session(self.session)
        return connection


class _Client:
    """The client's protocol: what it received."""

    transport = None

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        pass


def _answered(data: bytes) -> bool:
    """The response arrived whole (the relay adds its Via)."""
    return data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok\n")


def _pump(pairs) -> None:
    """Move bytes between wires until nothing moves: C{(wire, receiving end)} pairs."""
    moved = True
    while moved:
        moved = False
        for wire, end in pairs:
            data = wire.take()
            if data:
                end().dataReceived(data)
                moved = True


class Bumped:
    """One client connection bumped through the proxy, its origin connection made."""

    def __init__(self, world: _World) -> None:
        from tproxy_twist.testing import tcp_address
        from tproxy_twist.tls.membio import client_tls

        self.world = world
        Wire = world.Wire
        self.proxy_client = Wire(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
        self.connection = world.factory.buildProtocol(None)
        self.proxy_client.protocol = self.connection
        self.connection.makeConnection(self.proxy_client)
        self.client_wire = Wire(host=tcp_address(*CLIENT), peer=tcp_address(*ORIGIN))
        self.client = _Client()
        self.client_tls = client_tls(self.client_wire, self.client, world.client_creator)
        self.origin_wire = None
        self.proxy_origin = None
        self._move()
        attempt = world.connect.attempts.pop()
        protocol = attempt.factory.buildProtocol(tcp_address(*ORIGIN))
        self.proxy_origin = Wire(host=tcp_address(CLIENT[0], 40001), peer=tcp_address(*ORIGIN))
        self.proxy_origin.protocol = protocol
        protocol.makeConnection(self.proxy_origin)
        self.origin_wire = Wire(host=tcp_address(*ORIGIN), peer=tcp_address(CLIENT[0], 40001))
        self.origin = world.origin_peer(self.origin_wire)
        self._move()
        world.clock.advance(0)

    def _move(self) -> None:
        pairs = [
            (self.client_wire, lambda: self.proxy_client.protocol),
            (self.proxy_client, lambda: self.client_tls),
        ]
        if self.origin_wire is not None:
            pairs += [
                (self.proxy_origin, lambda: self.origin),
                (self.origin_wire, lambda: self.proxy_origin.protocol),
            ]
        _pump(pairs)

    def exchange(self) -> None:
        self.client.received = b""
        self.client_tls.write(REQUEST)
        self._move()
        if not _answered(self.client.received):
            raise SystemExit(f"bump: no answer: {self.client.received[:300]!r}")

    def close(self) -> None:
        self.client_tls.loseConnection()
        self._move()
        for wire in (self.proxy_client, self.client_wire, self.proxy_origin, self.origin_wire):
            if wire.disconnecting and not wire.disconnected:
                wire.disconnected = True
                wire.protocol.connectionLost(_lost())
        self.world.clock.advance(0)


class Direct:
    """The two peers talking to each other: their own share of the work."""

    def __init__(self, world: _World) -> None:
        from tproxy_twist.testing import tcp_address
        from tproxy_twist.tls.membio import client_tls

        Wire = world.Wire
        self.client_wire = Wire(host=tcp_address(*CLIENT), peer=tcp_address(*ORIGIN))
        self.client = _Client()
        self.creator = world.direct_creator
        self.client_tls = client_tls(self.client_wire, self.client, self.creator)
        self.origin_wire = Wire(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
        self.origin = world.origin_peer(self.origin_wire)
        self.pairs = [
            (self.client_wire, lambda: self.origin),
            (self.origin_wire, lambda: self.client_tls),
        ]
        _pump(self.pairs)

    def exchange(self) -> None:
        self.client.received = b""
        self.client_tls.write(REQUEST)
        _pump(self.pairs)
        if not _answered(self.client.received):
            raise SystemExit(f"direct: no answer: {self.client.received[:300]!r}")
        # After the first exchange (TLS 1.3 tickets come after the handshake).
        self.creator.session = self.client_tls.connection.get_session()

    def close(self) -> None:
        self.client_tls.loseConnection()
        _pump(self.pairs)


def _lost():
    from twisted.internet import error
    from twisted.python.failure import Failure

    return Failure(error.ConnectionDone())


class Plain:
    """One keep-alive connection through a C{tproxy} port's HTTP relay."""

    def __init__(self, world: _World) -> None:
        from prometheus_client import CollectorRegistry

        from tproxy_twist.http.relay import ProxyFactory, RelaySettings
        from tproxy_twist.metrics import PortMetrics
        from tproxy_twist.testing import FakeConnect, FakeTransport, tcp_address

        config = world.config
        port = config.ports[1]
        connect = FakeConnect()
        factory = ProxyFactory(
            port,
            settings=RelaySettings(config.timeouts, config.limits, "router"),
            connect=connect,
            clock=world.clock,
            local_addresses=frozenset(),
            metrics=PortMetrics("plain", "tproxy", CollectorRegistry()),
            reactor=world.clock,
        )
        self.client = factory.buildProtocol(None)
        self.transport = FakeTransport(host=tcp_address(*ORIGIN), peer=tcp_address(*CLIENT))
        self.client.makeConnection(self.transport)
        self.client.dataReceived(REQUEST)
        upstream = connect.attempts[-1]
        upstream.succeed()
        self.server = upstream.protocol
        self.upstream = upstream.transport
        self.server.dataReceived(RESPONSE)
        self.transport.clear()

    def exchange(self) -> None:
        self.client.dataReceived(REQUEST)
        self.server.dataReceived(RESPONSE)
        if not _answered(self.transport.take()):
            raise SystemExit("plain: no answer")
        self.upstream.clear()


def run(row: str, n: int, resumption: bool = True) -> float:
    """CPU seconds for C{n} exchanges (C{plain}, C{direct}, C{bump}) or connections."""
    world = _World(resumption)
    if row in ("plain", "direct", "bump"):
        one = {"plain": Plain, "direct": Direct, "bump": Bumped}[row](world)
        one.exchange()  # warm
        started = time.process_time()
        for _ in range(n):
            one.exchange()
        return time.process_time() - started
    kind = Bumped if row == "new" else Direct
    for _ in range(3):  # warm: the leaf is forged, the session kept
        c = kind(world)
        c.exchange()
        c.close()
    started = time.process_time()
    for _ in range(n):
        c = kind(world)
        c.exchange()
        c.close()
    return time.process_time() - started


def _callgrind(row: str, n: int, resumption: bool) -> int:
    """Instructions for C{n} more exchanges (or connections) of C{row}, exact."""
    totals = []
    for count in (n, 2 * n):
        argv = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, os.path.abspath(__file__), "--one", row, "-n", str(count),
        ]  # fmt: skip
        if not resumption:
            argv.append("--no-resumption")
        # One string hash for every run: dict and set layouts, and so the count, repeat.
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
        match = re.search(r"Collected : (\d+)", done.stderr)
        if match is None:
            raise SystemExit(f"callgrind: {done.stderr[-2000:]}")
        totals.append(int(match.group(1)))
    return totals[1] - totals[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bump_cost")
    parser.add_argument("-n", type=int, default=2000, help="exchanges (connections: n/10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true", help="instructions, not CPU time")
    parser.add_argument("--no-resumption", action="store_true")
    parser.add_argument("--only", default=",".join(ROWS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a callgrind child
    opts = parser.parse_args(argv)
    resumption = not opts.no_resumption
    if opts.one:
        run(opts.one, opts.n, resumption)
        return 0
    rows = opts.only.split(",")
    per: dict[str, float] = {}
    for row in rows:
        count = opts.n if row in ("plain", "direct", "bump") else max(opts.n // 10, 1)
        if opts.callgrind:
            per[row] = _callgrind(row, count, resumption) / count
        else:
            per[row] = min(run(row, count, resumption) for _ in range(opts.rounds)) / count * 1e6
    unit = "instructions" if opts.callgrind else "us CPU"
    form = "14,.0f" if opts.callgrind else "14.1f"
    for row in rows:
        print(f"{row:12} {per[row]:{form}} {unit}")
    if "bump" in per and "direct" in per:
        print(f"{'bump (own)':12} {per['bump'] - per['direct']:{form}} {unit} per exchange")
        if "plain" in per:
            extra = per["bump"] - per["direct"] - per["plain"]
            print(f"{'bump-plain':12} {extra:{form}} {unit} per exchange")
    if "new" in per and "direct-new" in per:
        own = per["new"] - per["direct-new"]
        print(f"{'new (own)':12} {own:{form}} {unit} per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
