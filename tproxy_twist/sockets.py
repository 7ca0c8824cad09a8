"""
Every socket option the proxy uses, in one place.

  - L{listening_socket}: a port's listener (SO_REUSEPORT, and IP_TRANSPARENT
    on tproxy ports) that the reactor adopts;
  - L{original_destination}: where an intercepted client meant to go;
  - L{connect_upstream}: the outbound connection, bound to the client's own
    address on spoofing ports (IP_TRANSPARENT + IP_BIND_ADDRESS_NO_PORT);
  - L{LocalAddresses}: this host's addresses, to refuse connections that
    would loop back into ourselves;
  - L{serve_accepts}: a listener's accept loop (out of descriptors, it pauses
    instead of spinning);
  - L{DirectWriter}: writes straight to the socket, held to the end of the
    reactor's batch of events (L{hold_writes}).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from os import strerror

from twisted.internet import abstract, address, base, main, tcp
from twisted.internet import error as twisted_error
from twisted.internet.interfaces import IConnector, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ListenAddress
from .logthrottle import LogThrottle

_log = Logger()

# From <linux/in.h>, <linux/in6.h> and <linux/netfilter_ipv4.h>; the socket
# module does not export all of them.
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = socket.IPPROTO_IPV6

#: errnos of a failed spoofing bind: the kernel would not let us use the
#: client's address (no capability, or no TPROXY support).
SPOOF_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EPERM, errno.EACCES})


def unmap(host: str) -> str:
    """C{"::ffff:198.51.100.2"} -> C{"198.51.100.2"}; other addresses unchanged."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def set_transparent(sock: socket.socket, family: int) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT): needs CAP_NET_ADMIN or CAP_NET_RAW."""
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def listening_socket(
    address: ListenAddress, *, transparent: bool, backlog: int = 1024
) -> socket.socket:
    """
    A bound, listening, non-blocking socket for one configured port.

    Every worker opens its own with SO_REUSEPORT, so each has its own accept
    queue.  A C{::} socket serves IPv4 too (IPV6_V6ONLY off), which TPROXY's
    IPv4 socket lookup finds as well.  TCP_NODELAY is set on the listener:
    accepted connections inherit it (Linux), so none needs a setsockopt.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted connections inherit TCP_NODELAY from the listener (Linux):
        # one setsockopt per listener instead of one per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent:
            set_transparent(sock, address.family)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def nat_original_destination(sock: socket.socket) -> tuple[str, int]:
    """
    The destination a NAT REDIRECT rewrote, from conntrack (SO_ORIGINAL_DST).
    Raises C{OSError} (ENOENT) for a connection that was not redirected.
    """
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return unmap(host), port
    raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


# --- the upstream connector -------------------------------------------------------
# tcp.Client and tcp.Connector are Twisted's own POSIX TCP classes; we
# override createInternetSocket (documented for subclasses), and the private
# Connector._makeTransport (the one hook that picks the transport class) and
# _BaseBaseClient._finishInit (where a connection attempt starts).  Stable
# since Twisted 12; tests/unit/test_twisted_internals.py names them; keep
# this the only place that does it.
#
# Why: the upstream address is always an IP literal, yet Twisted connects
# one reactor turn later through a callLater(0) and a Deferred (name
# resolution that is never needed), and on completion calls connect() again,
# then removes the socket from epoll and adds it back (three epoll_ctl).
# _UpstreamClient connects at once and, when the socket turns writable,
# checks SO_ERROR and switches epoll to reading with one epoll_ctl.


# --- closing ------------------------------------------------------------------------------
# Twisted's loseConnection, with nothing left to write, stops reading (epoll_ctl
# DEL), starts writing (ADD) and closes when the socket turns writable: a reactor
# event, then another DEL, shutdown() and close().  A connection of the worker
# with nothing buffered closes on the next reactor turn instead (one callLater),
# with close() alone: shutdown() before close() only matters for a descriptor
# shared with another process, and the worker's sockets are close-on-exec and
# never inherited (Twisted's own comment on _closeSocket says as much).  Bytes
# written after loseConnection are still sent first (they take Twisted's way).

_CONNECTION_DONE = Failure(main.CONNECTION_DONE)  # shared, as Twisted's own faildict does


class _ClosesWhenIdle:
    """
    Mixin for the worker's TCP transports (L{AcceptedConnection},
    L{_UpstreamClient}): C{loseConnection} without a writable event when
    nothing waits to be written; no C{shutdown()} before C{close()}.
    """

    _shouldShutdown = False

    def _nothing_to_write(self) -> bool:
        return (
            self.producer is None
            and not self._tempDataLen
            and len(self.dataBuffer) <= self.offset
            and not self._writeDisconnecting
            and not self._writeDisconnected
        )

    # True while a DirectWriter holds bytes in this transport's buffer for the
    # end of the reactor's batch: they are sent before the next turn, so the
    # close need not wait for a writable event either.
    _writes_held = False

    def loseConnection(self) -> None:
        if (
            not self.connected
            or self.disconnecting
            or not (self._writes_held or self._nothing_to_write())
        ):
            super().loseConnection()
            return
        self.stopReading()
        self.stopWriting()
        self.disconnecting = 1
        self.reactor.callLater(0, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.disconnected or self._aborting:
            return  # lost meanwhile (the peer reset it), or aborted: that says how it ended
        if not self._nothing_to_write():
            self.startWriting()  # written meanwhile: flushed first, then closed (Twisted's way)
            return
        self.connectionLost(_CONNECTION_DONE)


class AcceptedConnection(_ClosesWhenIdle, tcp.Server):
    """
    The transport of an accepted connection in a worker (L{serve_accepts}):
    Twisted's C{tcp.Server}, closed as L{_ClosesWhenIdle} says, and without
    the two strings C{tcp.Server.__init__} formats per connection for log
    prefixes and C{repr} (made when asked for: Twisted asks only to log).
    """

    def __init__(self, sock, protocol, client, server, sessionno, reactor) -> None:
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    @property
    def logstr(self) -> str:
        protocol = getattr(self, "protocol", None)  # gone after connectionLost
        prefix = self._getLogPrefix(protocol) if protocol is not None else "-"
        return f"{prefix},{self.sessionno},{self.hostname}"

    @property
    def repstr(self) -> str:
        protocol = getattr(self, "protocol", None)
        name = type(protocol).__name__ if protocol is not None else "-"
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"


class _UpstreamClient(_ClosesWhenIdle, tcp.Client):
    """A client transport to an IP literal, connected without Twisted's detours."""

    def __init__(self, host, port, bindAddress, connector, reactor=None) -> None:
        # tcp.Client.__init__ for an IP literal (every caller resolves names first),
        # without its isIPAddress/isIPv6Address checks of the host and of the bind
        # address and makeBinding: about 3 % of a spliced TLS connection (py-spy).
        if "%" in host:  # a scoped IPv6 address: Twisted resolves its scope
            super().__init__(host, port, bindAddress, connector, reactor)
            return
        # The attributes in Twisted's order (the instances share their dict keys).
        self.connector = connector
        self.addr = (host, port)
        self._requiresResolution = False
        if ":" in host:
            self.addr = (host, port, 0, 0)
            self.addressFamily = socket.AF_INET6
            self._addressType = address.IPv6Address
        whenDone = self.resolveAddress
        err = None
        skt = None
        try:
            skt = self.createInternetSocket()
        except OSError as se:
            err = twisted_error.ConnectBindError(se.args[0], se.args[1])
            whenDone = None
        if whenDone and bindAddress is not None:
            try:
                skt.bind(bindAddress)
            except OSError as se:
                err = twisted_error.ConnectBindError(se.args[0], se.args[1])
                whenDone = None
        self._finishInit(whenDone, skt, err, reactor)

    def createInternetSocket(self) -> socket.socket:
        # Non-blocking from the start (SOCK_NONBLOCK): Twisted's setblocking(False)
        # here and again in Connection.__init__ are two ioctl calls.
        sock = socket.socket(self.addressFamily, self.socketType | socket.SOCK_NONBLOCK)
        # Set before connect(): the relay never wants Nagle towards the origin.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _finishInit(self, whenDone, skt, error, reactor) -> None:
        if not whenDone or self._requiresResolution:
            super()._finishInit(whenDone, skt, error, reactor)
            return
        # tcp.Connection.__init__ without its setblocking(False): the socket is
        # non-blocking already (createInternetSocket).
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        self.fileno = skt.fileno
        self.protocol = None
        self.realAddress = self.addr
        # Every attribute Twisted adds later, now, in a fixed order: the instance
        # keeps its compact shared-key dict (measured with bench/idle_memory.py:
        # otherwise CPython 3.11 turns it into a full dict when logstr is set,
        # about 900 bytes per connection).
        self.connected = 0
        self.logstr = ""
        try:
            result = skt.connect_ex(self.addr)
        except OSError as e:
            result = e.args[0]
        if result in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            # Completion and failure both wake doRead/doWrite (EPOLLOUT, EPOLLERR).
            # Reading too: a refused connect wakes doRead, which reads SO_ERROR
            # (watched for writing only, Twisted reports a refusal without its errno).
            both = getattr(reactor, "add_reader_and_writer", None)
            if both is not None:
                both(self)  # the worker reactor: one epoll_ctl instead of two
            else:
                self.startReading()
                self.startWriting()
        elif result == 0 or result == errno.EISCONN:
            reactor.callLater(0, self._connect_event)
        else:
            # Never fail inside connectTCP: the caller hears of it a turn later, as from Twisted.
            failure = twisted_error.getConnectError((result, strerror(result)))
            reactor.callLater(0, self.failIfNotConnected, failure)

    def _connect_event(self) -> None:
        if not hasattr(self, "connector"):
            return  # failed meanwhile (the connect timeout, stopConnecting)
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(twisted_error.getConnectError((err, strerror(err))))
            return
        self.stopWriting()  # one epoll_ctl(MOD): reading only from now on
        self._connectDone()  # builds the protocol; startReading() is a no-op now
        factory = getattr(self.connector, "factory", None)
        if self.connected and _forgets_lost_connections(factory):
            # The Connector (and through it the factory) would only be told
            # connectionLost at the end, which such a factory ignores: let both
            # go now (about 250 bytes per parked connection).
            self.connector = _CONNECTED

    # Until _connectDone sets C{connected}, readiness means the attempt ended.  (No
    # attribute of our own: one more key costs every transport a larger dict.)
    def doRead(self):
        if not self.connected:
            return self._connect_event()
        return super().doRead()

    def doWrite(self):
        if not self.connected:
            return self._connect_event()
        return super().doWrite()


class _Connected:
    """The connector of an established connection whose factory ignores its end."""

    __slots__ = ()

    def connectionLost(self, reason) -> None:
        pass


_CONNECTED = _Connected()


def _forgets_lost_connections(factory) -> bool:
    """Whether C{factory} does nothing when its connection ends (ClientFactory's defaults)."""
    kind = type(factory)
    return (
        isinstance(factory, ClientFactory)
        and kind.clientConnectionLost is ClientFactory.clientConnectionLost
        and kind.stopFactory is ClientFactory.stopFactory
        and kind.doStop is ClientFactory.doStop
    )


class _TransparentClient(_UpstreamClient):
    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        set_transparent(sock, self.addressFamily)
        # Let connect() pick the source port: bind() with port 0 would
        # reserve one per client address and run out under load.
        sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        return sock


class _UpstreamConnector(tcp.Connector):
    def __init__(self, host, port, factory, timeout, bindAddress, reactor) -> None:
        # tcp.Connector.__init__ for an IP literal and a numeric port: no isIPv6Address.
        self.host, self.port = host, port
        if ":" in host:
            self._addressType = address.IPv6Address
        self.bindAddress = bindAddress
        base.BaseConnector.__init__(self, factory, timeout, reactor)

    def _makeTransport(self) -> tcp.Client:
        return _UpstreamClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _TransparentConnector(_UpstreamConnector):
    def _makeTransport(self) -> tcp.Client:
        return _TransparentClient(self.host, self.port, self.bindAddress, self, self.reactor)


UpstreamConnect = Callable[[str, int, ClientFactory, float, "str | None"], IConnector]


def connect_upstream(reactor: object) -> UpstreamConnect:
    """
    Return C{connect(host, port, factory, timeout, source_ip)}.  With a
    C{source_ip} the socket is transparent and bound to C{(source_ip, 0)}:
    the origin sees that address.  Never the client's port: the 4-tuple
    could clash with the client's own connection.
    """

    def connect(
        host: str, port: int, factory: ClientFactory, timeout: float, source_ip: str | None
    ) -> IConnector:
        if source_ip is None:
            connector = _UpstreamConnector(host, port, factory, timeout, None, reactor)
        else:
            connector = _TransparentConnector(host, port, factory, timeout, (source_ip, 0), reactor)
        connector.connect()
        return connector

    return connect


def open_upstream(host: str, port: int, source_ip: str | None) -> socket.socket:
    """
    A raw non-blocking socket connecting to C{(host, port)} (an IP literal,
    never a scoped IPv6 address), for an owner that watches it itself (a
    L{tproxy_twist.zerocopy.SplicePump}): no Twisted transport, connector or
    protocol.  The options and the spoofing bind are L{connect_upstream}'s:
    TCP_NODELAY; with a C{source_ip}, IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT
    and a bind to C{(source_ip, 0)}.

    The connection is usually still being made when this returns: the socket
    turns writable when it is done (C{SO_ERROR} says how it went).  Raises
    L{twisted.internet.error.ConnectBindError} when no socket can be made or
    the bind fails (out of descriptors, spoofing refused), and Twisted's
    connect error for the errno (refused, unreachable, ...) when C{connect()}
    fails at once: the errors a Twisted connector reports, so callers
    classify both paths alike.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as e:
        raise twisted_error.ConnectBindError(e.errno, e.strerror) from None
    try:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source_ip is not None:
                set_transparent(sock, family)
                sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source_ip, 0))
        except OSError as e:
            raise twisted_error.ConnectBindError(e.errno, e.strerror) from None
        result = sock.connect_ex((host, port) if family == socket.AF_INET else (host, port, 0, 0))
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EISCONN):
            raise twisted_error.getConnectError((result, strerror(result)))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_error_for(err: int) -> twisted_error.ConnectError:
    """
    Twisted's error for a failed connect's errno (C{SO_ERROR} of an
    L{open_upstream} socket), as a connector would report it.
    """
    return twisted_error.getConnectError((err, strerror(err)))


def probe_transparent_bind(family: int) -> OSError | None:
    """
    Squid's start-up test: can a transparent socket bind a non-local address?
    Returns C{None} when it can, or the error that says why not.
    """
    host = "203.0.113.254" if family == socket.AF_INET else "2001:db8::fe"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            set_transparent(sock, family)
            sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((host, 0))
    except OSError as e:
        return e
    return None


# --- this host's own addresses -------------------------------------------------

_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2


def host_addresses() -> frozenset[str]:
    """Every address configured on this host's (namespace's) interfaces, via netlink."""
    found: set[str] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        request = struct.pack("=IHHII", 24, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        nl.send(request + struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0))
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return frozenset(found)
                if kind == _NLMSG_ERROR:
                    raise OSError(errno.EIO, "netlink address dump failed")
                if kind == _RTM_NEWADDR:
                    found.update(_addresses_in(data[offset + 16 : offset + length]))
                offset += (length + 3) & ~3
                if length == 0:
                    break


def _addresses_in(message: bytes) -> list[str]:
    family = message[0]
    size = 4 if family == socket.AF_INET else 16
    result = []
    offset = 8  # struct ifaddrmsg
    while offset + 4 <= len(message):
        length, kind = struct.unpack_from("=HH", message, offset)
        if length < 4:
            break
        if kind in (_IFA_ADDRESS, _IFA_LOCAL) and length - 4 == size:
            result.append(socket.inet_ntop(family, message[offset + 4 : offset + 4 + size]))
        offset += (length + 3) & ~3
    return result


@functools.lru_cache(maxsize=4096)
def _loopback_or_unspecified(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


class LocalAddresses:
    """
    Answers "is this address one of ours?", refreshed at most every
    C{ttl} seconds so that a new address is known quickly and the check
    costs a set lookup on the hot path.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 5.0,
        source: Callable[[], frozenset[str]] = host_addresses,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._source = source
        self._addresses: frozenset[str] = frozenset()
        self._expires = float("-inf")

    def __contains__(self, host: str) -> bool:
        now = self._clock.seconds()
        if now >= self._expires:
            try:
                self._addresses = self._source()
                self._expires = now + self._ttl
            except OSError:
                pass  # out of descriptors, say: keep the last known set, retry next time
        if host in self._addresses:
            return True
        return _loopback_or_unspecified(host)


# --- writing without a trip through the reactor ---------------------------------
# Twisted's transport.write() always buffers and asks epoll for writability:
# an epoll_ctl(ADD), a loop iteration, a send() and an epoll_ctl(DEL) per
# write.  When nothing is buffered, sending directly is one syscall, and
# whatever the kernel does not take goes to Twisted's buffer as usual.  This
# reads tcp.Connection's private buffer state (dataBuffer, offset,
# _tempDataBuffer, _tempDataLen, the _write* flags, _aborting, socket): the
# only place besides zerocopy that does.
#
# Writes made while the worker's reactor handles a batch of events (one
# epoll_wait's worth) are held until the batch is handled, then sent, each
# socket's in one system call: as Redis sends its replies before it sleeps
# again, and Squid and HAProxy queue theirs for the end of their loop.  Sent
# at once, each request woke the origin (and each response the client) for
# itself, in the middle of the proxy's batch: on the 2-CPU VM a keep-alive
# request cost the proxy, nginx and wrk together 25-30 % more CPU than with
# the sends held (bench/README "Writes held to the end of the batch").  The
# held bytes wait in the transport's own buffer (without asking epoll for
# writability), so everything that looks there sees them in order: a
# SplicePump taking the socket over, loseConnection, a later write.  At most
# HELD_WRITERS sockets wait: the reactor sends them mid-batch beyond that, so
# a long batch (thousands of busy connections) delays nobody's bytes long.

HELD_WRITERS = 64

_held: list[DirectWriter] | None = None


class _Monotonic:
    """The clock of L{_held_failures} (no reactor at hand where writes are sent)."""

    seconds = staticmethod(time.monotonic)


# A bug met on every held write must not flood the log.
_held_failures = LogThrottle(_Monotonic())


def hold_writes() -> list[DirectWriter]:
    """
    From now on, L{DirectWriter}s hold what they are given (the start of a
    batch of events); the returned list is the writers holding something.
    """
    global _held
    _held = held = []
    return held


def send_held(held: list[DirectWriter]) -> None:
    """Send what the writers in C{held} hold, and empty it; writes go on being held."""
    for writer in held:  # a writer added meanwhile is sent too
        try:
            writer._send_held()
        except Exception:
            _held_failures.emit(_log.failure, "send-held", "sending a held write failed")
    held.clear()


def release_writes(held: list[DirectWriter]) -> None:
    """The batch is handled: send what is held, and write at once from now on."""
    global _held
    _held = None
    send_held(held)


class DirectWriter:
    """
    Writes to a TCP transport, straight to its socket when nothing is
    buffered.  What cannot go at once goes to the transport's own buffer
    (C{write} and C{writeSequence}), which Twisted writes when the socket
    turns writable.

    Backpressure (L{set_producer}) is registered with the transport only
    when a write really has to be buffered: until then the socket took
    everything and there is nothing to pause for.  Registering at once, for
    every connection, costs each transport a full instance dict (Twisted adds
    three attributes), about 400 bytes per parked keep-alive connection.
    """

    __slots__ = ("_transport", "_sock", "_producer", "_holding")

    def __init__(self, transport: tcp.Connection) -> None:
        self._transport = transport
        self._sock = transport.socket
        self._producer = None
        self._holding = False

    def set_producer(self, producer) -> None:
        """
        C{producer} (a streaming C{IPushProducer}) is paused while this
        transport's buffer is full, from the first write that is buffered on.
        A producer registered before is unregistered.
        """
        transport = self._transport
        if transport.producer is not None and transport.producer is not producer:
            transport.unregisterProducer()
        self._producer = producer

    def drop_producer(self, producer) -> None:
        """Forget C{producer} (its connection is gone), registered or not."""
        if self._producer is producer:
            self._producer = None
        transport = self._transport
        if transport.producer is producer and producer is not None:
            transport.unregisterProducer()

    def _buffering(self):
        """
        Where a write that has to wait goes (the transport), with the producer
        registered with the transport first.
        """
        transport = self._transport
        producer = self._producer
        if producer is not None and transport.producer is None and not transport.disconnected:
            transport.registerProducer(producer, True)
        return transport

    def _idle(self) -> bool:
        t = self._transport
        return not (
            t._tempDataLen
            or len(t.dataBuffer) > t.offset
            or t.disconnecting
            or t._writeDisconnected
            or t._writeDisconnecting
            or not t.connected
        )

    def write(self, data: bytes) -> None:
        if not self._holding:
            if not self._idle():
                self._buffering().write(data)
                return
            if _held is None:
                self._send(data)
                return
            self._hold()
        t = self._transport
        t._tempDataBuffer.append(data)
        t._tempDataLen += len(data)

    def write_sequence(self, parts: list[bytes]) -> None:
        if not self._holding:
            if not self._idle():
                self._buffering().writeSequence(parts)
                return
            if _held is None:
                self._send_sequence(parts)
                return
            self._hold()
        t = self._transport
        t._tempDataBuffer.extend(parts)
        t._tempDataLen += sum(map(len, parts))

    def _hold(self) -> None:
        """From now until the batch's end, what is written waits in the transport's buffer."""
        self._holding = True
        self._transport._writes_held = True
        _held.append(self)

    def _send_held(self) -> None:
        """
        Send what this batch held in the transport's buffer, unless the
        connection is gone (its bytes with it) or something took them meanwhile
        (a pump that took the socket over).
        """
        self._holding = False
        t = self._transport
        t._writes_held = False
        parts = t._tempDataBuffer
        if not parts or t.disconnected:
            return
        if len(t.dataBuffer) > t.offset:
            # Twisted has older bytes of its own (it started writing after the
            # hold): it writes everything, in order.
            self._buffering().startWriting()
            return
        t._tempDataBuffer = []
        t._tempDataLen = 0
        if t._aborting:
            # Sent, as they would have been had they not been held; what the
            # socket does not take goes with the abort.
            try:
                self._sock.sendmsg(parts)
            except OSError:
                pass
            return
        if len(parts) == 1:
            self._send(parts[0])
        else:
            self._send_sequence(parts)

    def _send(self, data: bytes) -> None:
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._transport.write(data)  # Twisted notices the error and closes
            return
        if sent < len(data):
            self._buffering().write(data[sent:])

    def _send_sequence(self, parts: list[bytes]) -> None:
        try:
            sent = self._sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._transport.writeSequence(parts)
            return
        for i, part in enumerate(parts):
            if sent < len(part):
                rest = parts[i:]
                rest[0] = part[sent:]
                self._buffering().writeSequence(rest)
                return
            sent -= len(part)


class TransportWriter:
    """
    The same interface over any transport (tests' fakes, TLS), through
    Twisted; its producer is registered at once.
    """

    __slots__ = ("write", "write_sequence", "_transport")

    def __init__(self, transport) -> None:
        self.write = transport.write
        self.write_sequence = transport.writeSequence
        self._transport = transport

    def set_producer(self, producer) -> None:
        transport = self._transport
        if transport.producer is producer:
            return
        if transport.producer is not None:
            transport.unregisterProducer()
        transport.registerProducer(producer, True)

    def drop_producer(self, producer) -> None:
        if producer is not None and self._transport.producer is producer:
            self._transport.unregisterProducer()


def writer_for(transport) -> DirectWriter | TransportWriter:
    """
    The writer for C{transport}: straight to the socket for plain TCP; through
    Twisted otherwise, and always once TLS is on the connection (what goes to
    the socket must be encrypted by the transport's TLS layer first).
    """
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return DirectWriter(transport)
    return TransportWriter(transport)


# --- the accept loop --------------------------------------------------------------------
# tcp.Port.doRead, replaced on each adopted listener.  Twisted's own, when
# accept() fails with EMFILE on a port it did not bind itself (adoptStreamPort:
# no reserved descriptor), logs "Could not accept new connection" and returns
# with the connection still queued: the listener stays readable, so every
# reactor turn tries again and logs again, a busy loop and a log flood for as
# long as the descriptors are gone.  Here, as nginx and Squid do, accepting
# pauses for a moment and the connections wait in the kernel's queue; one log
# line per 10 s says so.  It also skips what Twisted's loop does per connection
# for other platforms (a logging context, a generator, getnameinfo for every
# IPv6 peer).  The tcp.Port attributes used (socket, factory, numberAccepts,
# sessionno, transport, _buildAddr, reactor) are pinned by
# tests/unit/test_twisted_internals.py.

#: accept() errors that mean "no resources now": pause, then try again.
_ACCEPT_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection only (it went away, netfilter refused it).
_ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
#: Seconds a listener stops accepting after a shortage (nginx: accept_mutex_delay).
ACCEPT_PAUSE = 0.5


def serve_accepts(
    port: tcp.Port,
    clock: IReactorTime,
    *,
    room: Callable[[], int],
    may_resume: Callable[[], bool],
    on_shortage: Callable[[OSError], None],
) -> None:
    """
    Replace C{port.doRead} (a listening C{tcp.Port}) with an accept loop
    that accepts at most C{room()} connections per readiness (none when it
    is 0), and that on a shortage of descriptors or memory stops reading the
    listener for L{ACCEPT_PAUSE} seconds, calls C{on_shortage(error)} and
    resumes only if C{may_resume()} (the port still open, the budget not
    full).
    """
    listener = port.socket
    # The worker's own transport where the port has Twisted's (a test may give another).
    make_transport = AcceptedConnection if port.transport is tcp.Server else port.transport
    resuming = []
    throttle = LogThrottle(clock)  # a bug met per connection must not flood the log

    def resume() -> None:
        resuming.clear()
        if may_resume():
            port.startReading()

    def doRead() -> None:
        free = room()
        if free <= 0:
            return  # another port filled the budget in this reactor turn
        try:
            accepted = accept(min(port.numberAccepts, free))
        except Exception:
            # As Twisted's doRead: whatever went wrong, the listener stays open
            # (an exception out of doRead would make the reactor close it).
            throttle.emit(_log.failure, "accept", "accepting on {port}", port=port)
            return
        # Twisted's batch sizing: a full batch suggests more are waiting.
        if accepted and accepted == port.numberAccepts:
            port.numberAccepts += 20
        else:
            port.numberAccepts = max(1, accepted)

    def accept(limit: int) -> int:
        accepted = 0
        factory = port.factory
        while accepted < limit:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _ACCEPT_SKIP:
                    continue
                if e.errno in _ACCEPT_SHORTAGE:
                    port.stopReading()
                    if not resuming:
                        resuming.append(clock.callLater(ACCEPT_PAUSE, resume))
                    on_shortage(e)
                    break
                raise
            accepted += 1
            if len(addr) == 4 and addr[3]:
                # A scoped IPv6 address (link-local): Twisted's form, "fe80::1%eth0".
                host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                addr = (host[0], *addr[1:])
            protocol = factory.buildProtocol(port._buildAddr(addr))
            if protocol is None:
                sock.close()
                continue
            session = port.sessionno
            port.sessionno = session + 1
            transport = make_transport(sock, protocol, addr, port, session, port.reactor)
            protocol.makeConnection(transport)
        return accepted

    port.doRead = doRead
