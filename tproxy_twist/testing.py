"""
Public fakes for testing the relay without sockets: a transport that
records what was written, an upstream connector that records where, and
from which source address, connections were opened, and TLS ClientHellos
built byte by byte.
"""

from __future__ import annotations

import struct
import time

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, NotConnectingError, UserError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure


def tcp_address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class FakeTransport(StringTransport):
    """A StringTransport with the TCP-only methods the relay calls."""

    def __init__(self, host=None, peer=None) -> None:
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self.nodelay = False
        self.write_closed = False
        self.handle = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def getHandle(self):
        return self.handle

    def unregisterProducer(self) -> None:
        # Like Twisted's FileDescriptor: unregistering nothing is fine.
        self.producer = None
        self.streaming = None

    @property
    def closed(self) -> bool:
        return self.disconnecting or self.disconnected

    def take(self) -> bytes:
        """Everything written since the last take()."""
        data = self.value()
        self.clear()
        return data


class UpstreamAttempt:
    """One call of the connect function: succeed or fail it."""

    def __init__(self, host, port, factory, timeout, source_ip) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.source_ip = source_ip
        self.protocol = None
        self.transport: FakeTransport | None = None
        self.stopped = False  # stopConnecting() was called

    def succeed(self) -> FakeTransport:
        self.protocol = self.factory.buildProtocol(tcp_address(self.host, self.port))
        self.transport = FakeTransport(
            host=tcp_address(self.source_ip or "203.0.113.1", 40000),
            peer=tcp_address(self.host, self.port),
        )
        self.protocol.makeConnection(self.transport)
        return self.transport

    def fail(self, exception: BaseException) -> None:
        self.factory.clientConnectionFailed(None, Failure(exception))

    def stopConnecting(self) -> None:
        """As a Twisted connector: the attempt fails with a UserError."""
        if self.transport is not None:
            raise NotConnectingError()
        self.stopped = True
        self.fail(UserError())

    def close(self, reason: BaseException | None = None) -> None:
        """The upstream end closes the connection."""
        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


class FakeConnect:
    """Stands in for L{tproxy_twist.sockets.connect_upstream}'s function."""

    def __init__(self) -> None:
        self.attempts: list[UpstreamAttempt] = []

    def __call__(self, host, port, factory, timeout, source_ip):
        attempt = UpstreamAttempt(host, port, factory, timeout, source_ip)
        self.attempts.append(attempt)
        return attempt

    @property
    def last(self) -> UpstreamAttempt:
        return self.attempts[-1]


# --- TLS ClientHellos, built byte by byte -------------------------------------------


def tls_vector(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + tls_vector(2, data)


def sni_extension(name: bytes) -> bytes:
    return extension(0, tls_vector(2, b"\x00" + tls_vector(2, name)))


def alpn_extension(protocols: list[bytes]) -> bytes:
    return extension(16, tls_vector(2, b"".join(tls_vector(1, p) for p in protocols)))


def versions_extension(versions: list[int]) -> bytes:
    return extension(43, tls_vector(1, b"".join(struct.pack("!H", v) for v in versions)))


def hello_message(
    extensions: list[bytes] | None = None,
    *,
    suites: tuple[int, ...] | list[int] = (0x1301, 0x1302, 0xC02F),
    legacy_version: int = 0x0303,
    session_id: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (header included)."""
    body = (
        struct.pack("!H", legacy_version)
        + b"\x42" * 32
        + tls_vector(1, session_id)
        + tls_vector(2, b"".join(struct.pack("!H", s) for s in suites))
        + tls_vector(1, b"\x00")
    )
    if extensions is not None:
        body += tls_vector(2, b"".join(extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, cuts: tuple[int, ...] | list[int] = ()) -> bytes:
    """C{handshake} in TLS records, a new record at each cut offset."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(handshake))), len(handshake)]
    out = b""
    for start, end in zip(bounds, bounds[1:], strict=False):
        out += b"\x16\x03\x01" + tls_vector(2, handshake[start:end])
    return out


class FakeNames:
    """An IHostnameResolver answering at once from a dict of name → addresses."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.names.get(hostName, []):
            receiver.addressResolved(tcp_address(address, portNumber))
        receiver.resolutionComplete()
        return receiver


def iterate_until(reactor, done, what: str, timeout: float = 20.0) -> None:
    """
    Turn a real C{reactor} (sockets on loopback) until C{done()} is true;
    AssertionError naming C{what} if C{timeout} seconds pass first.
    """
    give_up = time.monotonic() + timeout
    while not done():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        reactor.iterate(0.01)


def loopback_forward_factory(reactor, origin_port: int, *, limits: str = "", pseudonym="test"):
    """
    The relay of a forward port (real upstream connector, metrics on) for an
    origin on loopback C{origin_port}: without the forward ports' built-in
    refusals (loopback, the host's own addresses), so in-process benchmarks
    and socket tests can use it.  C{limits}: extra C{[limits]} lines.
    """
    from prometheus_client import CollectorRegistry

    from . import config as C
    from .http.relay import ProxyFactory, RelaySettings
    from .metrics import PortMetrics
    from .resolver import DestinationResolver
    from .sockets import connect_upstream

    config = C.loads(
        f"[limits]\n{limits}\n"
        '[[port]]\nname = "fwd"\nlisten = "127.0.0.1:3128"\nmode = "forward"\n'
        f"connect_ports = [{origin_port}]\n"
    )
    port = config.ports[0]
    return ProxyFactory(
        port,
        settings=RelaySettings(config.timeouts, config.limits, pseudonym),
        connect=connect_upstream(reactor),
        clock=reactor,
        local_addresses=frozenset(),
        resolver=DestinationResolver(None, port.destinations, own=frozenset(), builtin=False),
        metrics=PortMetrics("fwd", "forward", CollectorRegistry()),
        reactor=reactor,
    )
