"""
Every socket option the proxy uses, in one place.

  - L{listening_socket}: a port's listener (SO_REUSEPORT, and IP_TRANSPARENT
    on tproxy ports) that the reactor adopts;
  - L{original_destination}: where an intercepted client meant to go;
  - L{connect_upstream}: the outbound connection, bound to the client's own
    address on spoofing ports (IP_TRANSPARENT + IP_BIND_ADDRESS_NO_PORT);
  - L{LocalAddresses}: this host's addresses, to refuse connections that
    would loop back into ourselves.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.interfaces import IConnector, IReactorTime
from twisted.internet.protocol import ClientFactory

from .config import ListenAddress

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
    IPv4 socket lookup finds as well.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


# --- the spoofing connector --------------------------------------------------
# tcp.Client and tcp.Connector are Twisted's own POSIX TCP classes; we
# override createInternetSocket (documented for subclasses) and the private
# Connector._makeTransport, the one hook that picks the transport class.
# Both are stable since Twisted 12; keep this the only place that does it.


class _TransparentClient(tcp.Client):
    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        set_transparent(sock, self.addressFamily)
        # Let connect() pick the source port: bind() with port 0 would
        # reserve one per client address and run out under load.
        sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        return sock


class _TransparentConnector(tcp.Connector):
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
            return reactor.connectTCP(host, port, factory, timeout)  # type: ignore[attr-defined]
        connector = _TransparentConnector(host, port, factory, timeout, (source_ip, 0), reactor)
        connector.connect()
        return connector

    return connect


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
# write.  When nothing is buffered, sending at once is one syscall, and
# whatever the kernel does not take goes to Twisted's buffer as usual.  This
# reads tcp.Connection's private buffer state (dataBuffer, offset,
# _tempDataLen, the _write* flags, socket): the only place that does.


class DirectWriter:
    """
    Writes to a TCP transport, straight to its socket when nothing is
    buffered.  What cannot go at once goes to C{buffered} (C{write} and
    C{writeSequence}): the transport itself by default; once TLS is started
    on it, the TLS layer's own way to the socket (L{tproxy_twist.tls.direct}).
    """

    __slots__ = ("_transport", "_sock", "_buffered")

    def __init__(self, transport: tcp.Connection, buffered=None) -> None:
        self._transport = transport
        self._sock = transport.socket
        self._buffered = transport if buffered is None else buffered

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
        if not self._idle():
            self._buffered.write(data)
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._buffered.write(data)  # Twisted notices the error and closes
            return
        if sent < len(data):
            self._buffered.write(data[sent:])

    def write_sequence(self, parts: list[bytes]) -> None:
        if not self._idle():
            self._buffered.writeSequence(parts)
            return
        try:
            sent = self._sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._buffered.writeSequence(parts)
            return
        for i, part in enumerate(parts):
            if sent < len(part):
                rest = parts[i:]
                rest[0] = part[sent:]
                self._buffered.writeSequence(rest)
                return
            sent -= len(part)


class TransportWriter:
    """The same interface over any transport (tests' fakes), through Twisted."""

    __slots__ = ("write", "write_sequence")

    def __init__(self, transport) -> None:
        self.write = transport.write
        self.write_sequence = transport.writeSequence


def writer_for(transport) -> DirectWriter | TransportWriter:
    """
    The writer for C{transport}: straight to the socket for plain TCP; through
    Twisted otherwise, and always once TLS is on the connection (what goes to
    the socket must be encrypted by the transport's TLS layer first).
    """
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return DirectWriter(transport)
    return TransportWriter(transport)
