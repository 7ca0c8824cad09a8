"""
TLS records straight to the socket: the bump's two TLS connections without
a reactor turn per write.

After C{transport.startTLS(...)} Twisted (26) puts a C{BufferingTLSTransport}
between the protocol and the socket.  Each write is held until the next
reactor iteration (C{callLater(0)}), encrypted, then handed to the TCP
transport, which buffers it and asks epoll for writability: per write a
delayed call, an C{epoll_ctl} to start writing, a loop iteration, the
C{send}, an C{epoll_ctl} to stop.  A bumped keep-alive request makes two such
writes (the request to the origin, the response to the client).

L{send_directly} changes two things on one such connection:

  - a write is encrypted at once (C{TLSMemoryBIOProtocol._write}: OpenSSL's
    C{SSL_write}, 16 KiB records), not in a later reactor turn;
  - the records go to the socket through L{DirectWriter} (one C{send} when
    nothing is buffered; otherwise into the TCP transport's buffer, through
    the TLS layer's bypass so they are not encrypted twice).

Everything else (reading, the handshake, producers, close_notify, errors)
stays Twisted's.  Private Twisted API, isolated here and pinned by
tests/unit/test_twisted_internals.py; where it is not as expected the
connection keeps Twisted's own path (slower, the same bytes).
"""

from __future__ import annotations

from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from zope.interface import providedBy
from zope.interface.declarations import Provides

from ..sockets import DirectWriter

__all__ = ["send_directly"]

_BIO_READ = 1 << 15  # as Twisted reads the send BIO


def send_directly(transport) -> bool:
    """
    Make C{transport} (a TCP transport on which C{startTLS} was just called)
    encrypt each write at once and send the records straight to its socket.
    Returns whether it did (C{False}: not a TCP transport, or Twisted's TLS
    layer is not the one this was written for; nothing was changed).
    """
    if not isinstance(transport, tcp.Connection) or not getattr(transport, "TLS", False):
        return False
    try:
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        tls = transport.protocol
        bypass = tls.transport  # _BypassTLS: writes to the socket, not through TLS again
        encrypt = TLSMemoryBIOProtocol._write
        if not isinstance(tls, TLSMemoryBIOProtocol) or bypass._connection is not transport:
            return False
        tls._tlsConnection, tls._producer, tls._flushSendBIO  # noqa: B018 (all still there?)
        aggregator = getattr(tls, "_aggregator", None)
        if aggregator is not None and (aggregator._buffer or aggregator._scheduled):
            return False  # something is already waiting in Twisted's buffer
    except AttributeError:
        return False
    _keep_interface_specs(tls, transport)
    sender = DirectWriter(transport, buffered=bypass)

    def flush_send_bio() -> None:
        try:
            data = tls._tlsConnection.bio_read(_BIO_READ)
        except WantReadError:
            return  # nothing to send
        sender.write(data)

    def write(data: bytes) -> None:
        # TLSMemoryBIOProtocol.write, without the aggregator in front of it.
        if tls.disconnecting and tls._producer is None:
            return
        encrypt(tls, data)

    def write_sequence(parts) -> None:
        write(b"".join(parts))

    tls._flushSendBIO = flush_send_bio
    tls.write = write
    tls.writeSequence = write_sequence
    return True


# zope.interface caches the spec of "an instance of C that directly provides
# I" weakly.  Twisted's TLS protocol, when made, declares each interface of
# its transport in turn (C{directlyProvides} in a loop: each call replaces the
# last), so all but the last spec die at once, and every new TLS connection
# builds about ten of them again: 1.3 ms of CPU per connection, twice per
# bumped connection (bench/README.md).  Holding them here makes them cache
# hits.  A handful per (TLS protocol class, transport class): bounded.
_KEPT_FOR: set[tuple[type, type]] = set()
_KEPT_SPECS: list = []


def _keep_interface_specs(tls, transport) -> None:
    key = (type(tls), type(transport))
    if key in _KEPT_FOR:
        return
    _KEPT_FOR.add(key)
    for interface in providedBy(transport):
        _KEPT_SPECS.append(Provides(type(tls), interface))
    _KEPT_SPECS.append(Provides(type(transport), ISSLTransport))
