"""
A TLS port's splice over real loopback sockets (the worker reactor, the raw
upstream socket of L{tproxy_twist.sockets.open_upstream} that the
L{SplicePump} connects and owns): what the fake transports of
test_tls_layer.py cannot show.  The same answers, metrics and access-log
lines as through Twisted's connector, for every way a connect ends.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import time

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.internet import error as neterror

from tproxy_twist import config as C
from tproxy_twist.metrics import PortMetrics, StreamMetrics, TLSPortMetrics
from tproxy_twist.reactor import WorkerReactor
from tproxy_twist.sockets import open_upstream
from tproxy_twist.testing import hello_message, iterate_until, records, sni_extension
from tproxy_twist.tls.layer import RELAYING, TLSConnection, TLSFactory

HELLO = records(hello_message([sni_extension(b"www.example.org")]))
_names = itertools.count()


class Proxy:
    """A TLS port on loopback whose original destination is C{origin_port}."""

    def __init__(
        self,
        origin_port: int,
        *,
        connect_timeout: float = 10.0,
        opener=None,
        stream_relay: str = "copy",
    ) -> None:
        self.reactor = reactor = WorkerReactor()
        self.name = f"tlssock{next(_names)}"
        config = C.loads(
            f"[timeouts]\nconnect = {connect_timeout}\n"
            f'[[port]]\nname = "{self.name}"\nlisten = "127.0.0.1:3130"\nmode = "tproxy"\n'
            f'protocol = "tls"\nspoof_client_ip = false\nstream_relay = "{stream_relay}"\n'
        )
        self.registry = CollectorRegistry()
        self.entries = []
        self.connections: list[TLSConnection] = []
        proxy = self

        class Connection(TLSConnection):
            def connectionMade(self):
                super().connectionMade()
                # Loopback has no TPROXY: the original destination is the origin.
                self.destination = ("127.0.0.1", origin_port)
                proxy.connections.append(self)

        class Factory(TLSFactory):
            def buildProtocol(self, addr):
                super().buildProtocol(addr)  # starts the sweeper
                return Connection(self)

        self.factory = Factory(
            config.ports[0],
            timeouts=config.timeouts,
            connect=self._no_twisted_connector,
            clock=reactor,
            local_addresses=frozenset(),
            metrics=PortMetrics(self.name, "tproxy", self.registry),
            tls_metrics=TLSPortMetrics(self.name),
            stream_metrics=StreamMetrics(self.name),
            access_log=self,
            reactor=reactor,
            open_upstream=opener or open_upstream,
        )
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    @staticmethod
    def _no_twisted_connector(*args):
        raise AssertionError("a splice between two TCP sockets needs no Twisted connector")

    def log(self, entry) -> None:
        self.entries.append(entry)

    def client(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.listening.getHost().port))
        sock.setblocking(False)
        return sock

    def run_until(self, done, what: str, timeout: float = 20.0) -> None:
        iterate_until(self.reactor, done, what, timeout)

    def sample(self, name: str, **labels) -> float:
        self.factory.flush_metrics()
        # The port's own series are in its registry; the stream counts in the default one.
        registry = REGISTRY if name == "tproxy_streams_total" else self.registry
        return registry.get_sample_value(name, {"port": self.name, **labels}) or 0.0

    def close(self) -> None:
        self.factory.abort_all()
        self.factory.shutdown()
        self.listening.stopListening()
        for _ in range(5):
            self.reactor.iterate(0)


def listener(backlog: int = 16) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def accept(proxy: Proxy, sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    got = []

    def accepted() -> bool:
        try:
            got.append(sock.accept()[0])
        except BlockingIOError:
            return False
        return True

    proxy.run_until(accepted, "the origin accepted")
    got[0].setblocking(False)
    return got[0]


def read_until_end(proxy: Proxy, sock: socket.socket) -> tuple[bytes, str]:
    """What C{sock} receives until its peer closes: the bytes, and "eof" or "reset"."""
    got = bytearray()
    how = []

    def ended() -> bool:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            how.append("reset")
            return True
        if not chunk:
            how.append("eof")
            return True
        got.extend(chunk)
        return False

    proxy.run_until(ended, "the connection's end")
    return bytes(got), how[0]


def stalled_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: a connect to it stays under way."""
    sock = listener(0)
    filler = socket.create_connection(sock.getsockname())
    return sock, filler


@pytest.fixture
def origin():
    sock = listener()
    yield sock
    sock.close()


def hello_is_reset_and_logged(proxy: Proxy, status: int, reason: str):
    """
    Send a hello from a new client: it must be reset with nothing sent, and
    one access-log entry (C{status}, no destination) and one upstream error
    (C{reason}) counted.  Returns the client socket and the entry.
    """
    client = proxy.client()
    client.sendall(HELLO)
    data, how = read_until_end(proxy, client)
    assert data == b""
    proxy.run_until(lambda: proxy.entries, "the access-log entry")
    (entry,) = proxy.entries
    assert (entry.status, entry.destination) == (status, None)
    assert proxy.sample("tproxy_upstream_errors_total", reason=reason) == 1
    return client, entry


@pytest.mark.parametrize("relay", ["copy", "splice"])
def test_a_hello_is_spliced_through_the_pump_and_logged_as_a_tunnel(origin, relay):
    proxy = Proxy(origin.getsockname()[1], stream_relay=relay)
    try:
        client = proxy.client()
        client.sendall(HELLO)
        upstream = accept(proxy, origin)
        got = b""
        while len(got) < len(HELLO):
            proxy.reactor.iterate(0.01)
            try:
                got += upstream.recv(65536)
            except BlockingIOError:
                pass
        assert got == HELLO
        connection = proxy.connections[0]
        assert connection.state == RELAYING and connection.upstream is None
        assert connection.pump is not None  # the pump owns both sockets
        # The port's stream_relay decides how the pump moves the bytes.
        assert connection.pump._forward.copy is (relay == "copy")
        upstream.sendall(b"s" * 4096)
        upstream.shutdown(socket.SHUT_WR)
        data, how = read_until_end(proxy, client)
        assert (data, how) == (b"s" * 4096, "eof")
        client.close()
        proxy.run_until(lambda: proxy.entries, "the access-log entry")
        (entry,) = proxy.entries
        assert (entry.status, entry.result, entry.action) == (200, "TCP_TUNNEL", "splice")
        assert entry.url == f"www.example.org:{origin.getsockname()[1]}"
        assert entry.destination == f"127.0.0.1:{origin.getsockname()[1]}"
        assert (entry.bytes_in, entry.bytes_out) == (len(HELLO), 4096)
        assert proxy.sample("tproxy_streams_total", how=relay) == 1
        assert proxy.sample("tproxy_upstream_connect_duration_seconds_count") == 1
        assert proxy.sample("tproxy_bytes_total", direction="out") == 4096
        assert read_until_end(proxy, upstream) == (b"", "eof")
        upstream.close()
    finally:
        proxy.close()


def test_a_refused_connect_resets_the_client_counts_refused_and_logs_a_502():
    closed = listener()
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    proxy = Proxy(port)
    try:
        client, entry = hello_is_reset_and_logged(proxy, 502, "refused")
        assert entry.result == "NONE"
        assert proxy.sample("tproxy_streams_total", how="copy") == 0
        assert proxy.factory.connections == set()
        client.close()
    finally:
        proxy.close()


def test_an_origin_that_never_answers_is_given_up_at_the_connect_timeout():
    stalled, filler = stalled_listener()
    proxy = Proxy(stalled.getsockname()[1], connect_timeout=0.3)
    try:
        client = proxy.client()
        client.sendall(HELLO)
        proxy.run_until(lambda: proxy.connections, "accepted")
        connection = proxy.connections[0]
        started = time.monotonic()
        data, how = read_until_end(proxy, client)
        assert data == b"" and time.monotonic() - started >= 0.25
        (entry,) = proxy.entries
        assert (entry.status, entry.destination) == (504, None)
        assert proxy.sample("tproxy_upstream_errors_total", reason="timeout") == 1
        assert connection.pump.ended is not None and connection.pump.connecting
        assert connection.pump._b.sock.fileno() == -1  # the attempt was called off
        client.close()
    finally:
        proxy.close()
        filler.close()
        stalled.close()


def test_a_client_that_leaves_while_connecting_calls_the_attempt_off_uncounted():
    stalled, filler = stalled_listener()
    proxy = Proxy(stalled.getsockname()[1])
    try:
        client = proxy.client()
        client.sendall(HELLO)
        proxy.run_until(
            lambda: proxy.connections and proxy.connections[0].pump is not None, "connecting"
        )
        connection = proxy.connections[0]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        proxy.run_until(lambda: proxy.entries, "the access-log entry")
        (entry,) = proxy.entries
        assert (entry.status, entry.destination, entry.action) == (0, None, "splice")
        assert connection.pump._b.sock.fileno() == -1
        for reason in ("refused", "timeout", "unreachable"):
            assert proxy.sample("tproxy_upstream_errors_total", reason=reason) == 0
        assert proxy.factory.connections == set()
    finally:
        proxy.close()
        filler.close()
        stalled.close()


@pytest.mark.parametrize(
    "error, status, reason",
    [
        (neterror.ConnectBindError(errno.EMFILE, "Too many open files"), 503, "no_descriptors"),
        (neterror.ConnectBindError(errno.EADDRNOTAVAIL, "Cannot assign"), 502, "spoof"),
        (neterror.getConnectError((errno.ENETUNREACH, "unreachable")), 502, "unreachable"),
    ],
    ids=["emfile", "spoof", "unreachable"],
)
def test_an_upstream_socket_that_cannot_be_opened_resets_the_client_and_is_counted(
    origin, error, status, reason
):
    def opener(host, port, source):
        raise error

    proxy = Proxy(origin.getsockname()[1], opener=opener)
    try:
        client, _ = hello_is_reset_and_logged(proxy, status, reason)
        client.close()
    finally:
        proxy.close()
