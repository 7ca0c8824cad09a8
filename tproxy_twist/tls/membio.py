"""
One TLS connection driven over OpenSSL's memory BIOs, straight on a TCP
transport: the bump's two TLS connections (towards the client with our
leaf, towards the origin verified) without Twisted's TLS protocol.

L{MemoryTLS} takes the TCP transport's place twice: it becomes the TCP
transport's protocol (the encrypted bytes come to it) and the transport of
the protocol that was there, or that is given, which from then on sees the
decrypted stream and writes plain bytes:

    TCP transport ──dataReceived──► MemoryTLS ──dataReceived──► protocol
         ▲                           │  ▲                          │
         └──── records (one send) ───┘  └──── write, loseConnection┘

What it saves against C{startTLS} (bench/README.md, "Branch bumprelay"):

  - no wrapper protocol, no C{directlyProvides} of ten interfaces per
    connection, no aggregation of writes in a later reactor turn;
  - reads: the records that arrived are decrypted in one loop and handed on
    in one C{dataReceived}; the loop stops when OpenSSL has nothing buffered
    (C{SSL_pending} and the read BIO's length) instead of on a C{WantReadError}
    per read, and the write BIO is looked at only when it holds something;
    one whole application-data record (the common case) costs two calls
    into OpenSSL, C{BIO_write} and C{SSL_read}, nothing asked besides (each
    call costs about 1,000-2,000 instructions of cffi and GIL hand-over);
  - writes: one C{SSL_write} of the whole write (the memory BIO takes it
    all), one C{BIO_read} of what is pending (a small write's records read
    into the scratch buffer without asking how long they are), one C{send}
    to the socket (L{DirectWriter}) when nothing is buffered;
  - L{MemoryTLS.deliver_to}: the decrypted bytes can go straight to the
    protocol that uses them, past one that would only pass them on;
  - a producer registered by the protocol is registered with the TCP
    transport only once a write has to be buffered (as L{DirectWriter} does).

The contract towards the protocol is Twisted's for a TLS transport: writes
before the handshake is done wait for it; C{handshakeCompleted()} is called
on the protocol when it has one (C{IHandshakeListener}); C{loseConnection}
sends close_notify after what was written, then closes the TCP connection
(the peer's own close_notify is not waited for); a close_notify from the
peer is answered with ours and the connection closed; a TLS error (a failed
handshake, an alert, garbage) sends OpenSSL's alert if it has one and closes,
and the protocol's C{connectionLost} gets that error (a truncated stream: a
L{ConnectionLost}); there is no half-close (an EOF is the end).

Private pyOpenSSL API, isolated in the functions at the top of this module
(pinned by tests/unit/test_tls_membio.py): the connection's BIOs and its
binding's C{BIO_get_mem_data}, to learn how many bytes a BIO holds; its
binding's C{SSL_read}/C{SSL_write}/C{BIO_read}/C{BIO_write} into one
scratch buffer (bytes passed as the pointer: cffi takes them as they are),
with pyOpenSSL's own C{_raise_ssl_error} for every error (pyOpenSSL's
methods allocate a buffer and check arguments per call).
Where it is missing, pyOpenSSL's public methods are used and the loops read
until C{WantReadError}: slower, the same bytes.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet import error
from twisted.python.failure import Failure

from ..sockets import writer_for

__all__ = ["MemoryTLS", "client_tls", "server_tls"]

# At most one record's plaintext comes out of an SSL_read (16 KiB); the rest
# of a large read loops.  Reading more at once only allocates more.
_RECV = 1 << 15
# A bio_read without knowing how much is there (the fallback).
_BIO_CHUNK = 1 << 16
# A write this small is read back from the write BIO into the scratch buffer
# at once (its records are at most a few hundred bytes longer); a larger one
# asks the BIO how much it holds and reads it in one piece.
_SMALL_WRITE = _RECV // 2

try:
    from OpenSSL.SSL import _ffi, _lib

    _NULL = _ffi.NULL
    _mem_data = _lib.BIO_get_mem_data
    _SSL_read = _lib.SSL_read
    _SSL_write = _lib.SSL_write
    _BIO_read = _lib.BIO_read
    _BIO_write = _lib.BIO_write
    _from_buffer = _ffi.from_buffer
    _as_bytes = _ffi.buffer
    _unpack = _ffi.unpack  # bytes from a char[]: one call, one copy
    # One reactor thread: one buffer for every SSL_read and BIO_read of this
    # module (pyOpenSSL allocates one per call).
    _SCRATCH_SIZE = _RECV
    _SCRATCH = _ffi.new("char[]", _SCRATCH_SIZE)

    _SSL_pending = _lib.SSL_pending
    _SSL_do_handshake = _lib.SSL_do_handshake
    _SSL_get_error = _lib.SSL_get_error
    _SSL_ERROR_WANT_READ = _lib.SSL_ERROR_WANT_READ

    def _handshake_step(tls: SSL.Connection) -> bool:
        """
        C{tls.do_handshake()}: C{True} when done, C{False} while it waits for
        the peer (no C{WantReadError} raised and caught per step); any other
        outcome raises what pyOpenSSL raises.  A callback's exception (ALPN,
        verification) fails the handshake, never leaves it waiting, so
        pyOpenSSL's own error reporting sees every one of them.
        """
        result = _SSL_do_handshake(tls._ssl)
        if result == 1:
            return True
        if _SSL_get_error(tls._ssl, result) == _SSL_ERROR_WANT_READ:
            return False
        tls._raise_ssl_error(tls._ssl, result)
        return False  # not reached: OpenSSL had an error to report

    def _pending_in(tls: SSL.Connection) -> int:
        """Bytes OpenSSL holds for a further read: decrypted, or not read yet."""
        return _SSL_pending(tls._ssl) or _mem_data(tls._into_ssl, _NULL)

    def _pending_out(tls: SSL.Connection) -> int:
        """Encrypted bytes OpenSSL wrote that are still to be sent."""
        return _mem_data(tls._from_ssl, _NULL)

    def _recv(tls: SSL.Connection) -> bytes | None:
        """
        C{tls.recv}: SSL_read into the scratch buffer; C{None} when OpenSSL
        waits for more (no C{WantReadError} raised and caught: every
        handshake's end reads once with nothing to read), otherwise the same
        exceptions.
        """
        ssl = tls._ssl
        n = _SSL_read(ssl, _SCRATCH, _SCRATCH_SIZE)
        if n <= 0:
            if _SSL_get_error(ssl, n) == _SSL_ERROR_WANT_READ:
                return None
            tls._raise_ssl_error(ssl, n)
            return None  # not reached: OpenSSL had an error to report
        return _unpack(_SCRATCH, n)

    def _send(tls: SSL.Connection, data: bytes) -> int:
        """C{tls.send}: SSL_write; the same exceptions."""
        with _from_buffer(data) as pointer:
            n = _SSL_write(tls._ssl, pointer, len(data))
        if n <= 0:
            tls._raise_ssl_error(tls._ssl, n)
        return n

    def _bio_write(tls: SSL.Connection, data: bytes) -> None:
        """C{tls.bio_write}: the memory BIO takes everything."""
        with _from_buffer(data) as pointer:
            n = _BIO_write(tls._into_ssl, pointer, len(data))
        if n != len(data):
            tls.bio_write(data[max(n, 0) :])  # not reached with a memory BIO

    def _bio_read(tls: SSL.Connection, n: int) -> bytes:
        """C{tls.bio_read(n)} of C{n} bytes known to be pending."""
        if n > _SCRATCH_SIZE:
            return tls.bio_read(n)
        n = _BIO_read(tls._from_ssl, _SCRATCH, n)
        if n <= 0:
            raise WantReadError()
        return _unpack(_SCRATCH, n)

    _SSL_version = _lib.SSL_version
    _TLS1_3_VERSION = _lib.TLS1_3_VERSION

    def _is_tls13(tls: SSL.Connection) -> bool:
        """Whether C{tls} (its handshake done) speaks TLS 1.3."""
        return _SSL_version(tls._ssl) == _TLS1_3_VERSION

    _probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    _probe._into_ssl, _probe._from_ssl, _probe._ssl, _probe._raise_ssl_error  # noqa: B018
    _pending_in(_probe)
    del _probe
    EXACT_PENDING = True
except (ImportError, AttributeError):  # another pyOpenSSL: the portable functions below
    EXACT_PENDING = False


# pyOpenSSL's public methods: what the functions above do where its private
# API is missing (tests run MemoryTLS on these too).


def _portable_pending_in(tls: SSL.Connection) -> int:
    return _BIO_CHUNK  # unknown: read until WantReadError


def _portable_pending_out(tls: SSL.Connection) -> int:
    return _BIO_CHUNK


def _portable_recv(tls: SSL.Connection) -> bytes | None:
    try:
        return tls.recv(_RECV)
    except WantReadError:
        return None


def _portable_send(tls: SSL.Connection, data: bytes) -> int:
    return tls.send(data)


def _portable_bio_write(tls: SSL.Connection, data: bytes) -> None:
    tls.bio_write(data)


def _portable_bio_read(tls: SSL.Connection, n: int) -> bytes:
    return tls.bio_read(n)


def _portable_is_tls13(tls: SSL.Connection) -> bool:
    return False  # not known: what a TLS 1.3 server holds is sent at once


def _portable_handshake_step(tls: SSL.Connection) -> bool:
    try:
        tls.do_handshake()
    except WantReadError:
        return False
    return True


if not EXACT_PENDING:  # pragma: no cover - another pyOpenSSL
    _pending_in, _pending_out = _portable_pending_in, _portable_pending_out
    _recv, _send = _portable_recv, _portable_send
    _bio_write, _bio_read = _portable_bio_write, _portable_bio_read
    _handshake_step = _portable_handshake_step
    _is_tls13 = _portable_is_tls13


_NO_CLOSE_NOTIFY = "the peer closed without close_notify"


def _represents_eof(e: SSL.Error) -> bool:
    # As twisted.protocols.tls._representsEOF: the peer closed TCP without close_notify.
    if isinstance(e, SSL.SysCallError):
        return str(e.args[-1]).casefold().startswith("unexpected eof")
    queue = e.args[0] if e.args else None
    if not queue:
        return True
    return str(queue[-1][-1]).casefold().startswith("unexpected eof")


class _NoFactory:
    # Twisted's connection creators look for ALPN protocols of the wrapped
    # factory (protosFromProtocol): there is none.
    wrappedFactory = None


class MemoryTLS:
    """
    See the module docstring.  Made by L{client_tls} or L{server_tls}.

    @ivar protocol: the protocol that sees the decrypted stream.
    @ivar transport: the TCP transport.
    @ivar connection: the C{SSL.Connection} (its BIOs are memory BIOs).
    @ivar handshake_done: the TLS handshake completed.
    @ivar producer: the producer the protocol registered, or C{None}.
    """

    # Two per bumped connection, idle ones included: no __dict__ each.
    __slots__ = (
        "protocol",
        "transport",
        "connection",
        "handshake_done",
        "connected",
        "disconnecting",
        "producer",
        "_sender",
        "_waiting",
        "_reason",
        "_tls_over",
        "_aborted",
        "_ssl",
        "_into",
        "_from",
        "_fast",
        "_clean",
        "_receive",
        "_hold",
        "_server",
    )

    factory = _NoFactory()
    # For code that asks a transport, as Twisted's TLS transport answers.
    TLS = True

    def __init__(self, protocol, transport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.connection: SSL.Connection | None = None
        self.handshake_done = False
        self.connected = True
        self.disconnecting = False
        self.producer = None
        self._sender = writer_for(transport)
        self._waiting: list[bytes] = []  # written before the handshake (or a WantRead)
        self._reason: Failure | None = None  # what the protocol's connectionLost will get
        self._tls_over = False  # close_notify, an error or an abort: no more TLS either way
        self._aborted = False
        self._ssl = self._into = self._from = None  # the connection's (private API)
        # The inline paths apply: the private API is there, the handshake is done,
        # nothing waits to be written, TLS is not over (kept by _check_fast).
        self._fast = False
        self._clean = False  # the read BIO is known to be empty (the inline read path)
        self._receive = None  # deliver_to: where decrypted bytes go instead of the protocol
        # What the write BIO holds may wait for the next write (a TLS 1.3 server's
        # session tickets, or a KeyUpdate's answer): sent with it, in one send.
        self._hold = False
        self._server = False  # the server end (server_tls)

    # --- the TCP transport's protocol --------------------------------------------------

    def makeConnection(self, transport) -> None:
        # Never called: the TCP connection is made already (client_tls, server_tls).
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self._fast:
            # The common case inline: one record in, its plaintext out in one call.
            # A TCP transport's data is bytes, which cffi passes as the pointer.
            # Each call into OpenSSL costs about 2,000 instructions of cffi and
            # GIL hand-over besides its work: as few as can be (bench/bump_cost.py).
            into = self._into
            _BIO_write(into, data, len(data))
            n = _SSL_read(self._ssl, _SCRATCH, _SCRATCH_SIZE)
            if not 0 < n < _SCRATCH_SIZE:
                self._clean = False
                self._read([_unpack(_SCRATCH, n)] if n > 0 else [], None if n > 0 else n)
                return
            # Less than the buffer: the record's plaintext was read whole (one
            # record's, at most 16 KiB, per SSL_read): OpenSSL holds nothing decrypted.
            if self._clean and len(data) > 5 and len(data) == (data[3] << 8 | data[4]) + 5:
                # The read BIO was empty and this is one whole record: it was read
                # (the BIO is empty again), and it was application data, which
                # OpenSSL answers with nothing.
                answered = False
            elif _mem_data(into, _NULL):
                self._clean = False  # more records (or part of one) to read
                self._read([_unpack(_SCRATCH, n)])
                return
            else:
                # Everything was read; records before this one (a KeyUpdate, a
                # ticket) may have made OpenSSL answer.
                self._clean = answered = True
            receive = self._receive
            if receive is None:
                self.protocol.dataReceived(_unpack(_SCRATCH, n))
            else:
                receive(_unpack(_SCRATCH, n))
            if answered and self._fast and not self._hold and _mem_data(self._from, _NULL):
                self._flush()
            return
        if self._tls_over:
            return
        tls = self.connection
        _bio_write(tls, data)
        self._clean = False  # what is left of it is not known
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done or self._tls_over:
                return
        if self._waiting:
            self._write_waiting()
        self._read()

    def connectionLost(self, reason: Failure) -> None:
        tls = self.connection
        if not self._tls_over and tls is not None:
            if self.handshake_done and EXACT_PENDING and not _pending_in(tls):
                # Nothing is left to decrypt: the peer closed without close_notify.
                # Said here, not by an EOF fed to OpenSSL, whose fatal error would
                # make the session not resumable (an origin's, kept for the next
                # connection: verify.py) where the close itself lost nothing.
                if self._reason is None:
                    self._reason = Failure(error.ConnectionLost(_NO_CLOSE_NOTIFY))
            else:
                # Whatever was read still counts; then the missing close_notify is an EOF.
                tls.bio_shutdown()
                if self.handshake_done:
                    self._read()
                else:
                    self._handshake()
            self._tls_over = True
            self._fast = False
        reason = self._reason or reason
        self._reason = None
        self.connected = False
        self._fast = False
        self._receive = None
        self.connection = None  # no cycle through its callbacks' references to this
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    # --- TLS ---------------------------------------------------------------------------

    def _start(self, connection: SSL.Connection, data: bytes) -> None:
        self.connection = connection
        if EXACT_PENDING:
            self._ssl, self._into, self._from = (
                connection._ssl,
                connection._into_ssl,
                connection._from_ssl,
            )
        if data:
            self.dataReceived(data)
        else:
            self._handshake()

    def _handshake(self) -> None:
        tls = self.connection
        try:
            done = _handshake_step(tls)
        except WantReadError:  # not raised by the inline step; pyOpenSSL's
            done = False
        except SSL.Error:
            self._failed(Failure())
            return
        if not done:
            self._flush()
            return
        if self._reason is not None:  # failVerification, yet no error (cannot happen)
            self._failed(self._reason)
            return
        self.handshake_done = True
        self._check_fast()
        if _pending_out(tls):
            if self._server and _is_tls13(tls):
                # A TLS 1.3 server's session tickets, all that is left to send after
                # the client's Finished (ours went with the first flight): nothing
                # the client waits for.  They go with the first bytes written (or
                # the close_notify), in the same send.  (A TLS 1.2 server's Finished
                # and a client's are waited for.)
                self._hold = True
            else:
                self._flush()  # the Finished (the client's; a TLS 1.2 server's)
        completed = getattr(self.protocol, "handshakeCompleted", None)
        if completed is not None:
            completed()
        if self._waiting and not self._tls_over:
            self._write_waiting()
        if self.disconnecting and not self._tls_over and not self._waiting:
            if self.producer is None:
                self._shutdown()

    def _check_fast(self) -> None:
        self._fast = (
            EXACT_PENDING and self.handshake_done and not self._waiting and not self._tls_over
        )

    def deliver_to(self, receive) -> None:
        """
        From now on the decrypted bytes go to C{receive(data)} instead of the
        protocol's C{dataReceived}; the protocol keeps every other event.  For a
        protocol that would only pass them on (one call less per read).
        """
        self._receive = receive

    def failVerification(self, reason: Failure) -> None:
        """Twisted's verify callback found the wrong name: the handshake fails with C{reason}."""
        self._reason = reason

    def _read(self, parts: list[bytes] | None = None, failed: int | None = None) -> None:
        """
        Decrypt and deliver what the read BIO holds; C{parts}: plaintext read
        already; C{failed}: the result of an C{SSL_read} that read nothing
        (its error is raised here, once, not read again).
        """
        tls = self.connection
        if parts is None:
            parts = []
        while True:
            try:
                if failed is not None:
                    result, failed = failed, None
                    if _SSL_get_error(tls._ssl, result) == _SSL_ERROR_WANT_READ:
                        break  # records without data (session tickets): nothing to raise
                    tls._raise_ssl_error(tls._ssl, result)
                    break  # not reached: a failed SSL_read has an error to raise
                if not parts or _pending_in(tls):
                    data = _recv(tls)
                    if data is None:
                        break  # OpenSSL waits for more
                    parts.append(data)
                else:
                    break
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(parts)
                self._peer_closed()
                return
            except SSL.Error:
                self._deliver(parts)
                self._failed(Failure())
                return
        if parts:
            self._deliver(parts)
        if (
            not self._tls_over
            and self.connection is not None
            and not self._hold
            and _pending_out(tls)
        ):
            # A KeyUpdate answered (RFC 8446, 4.6.3: before our next application data,
            # so it may wait with whatever is held for the next write).
            self._flush()

    def _deliver(self, parts: list[bytes]) -> None:
        if not parts or self._aborted or self.protocol is None:
            return
        receive = self._receive or self.protocol.dataReceived
        receive(parts[0] if len(parts) == 1 else b"".join(parts))

    def _flush(self) -> None:
        """Send what OpenSSL wrote to the write BIO."""
        tls = self.connection
        self._hold = False
        n = _pending_out(tls)
        if not n:
            return
        if EXACT_PENDING:
            self._sender.write(_bio_read(tls, n))
            return
        parts = []
        while True:  # read until the BIO is empty, then one send
            try:
                parts.append(_bio_read(tls, n))
            except WantReadError:
                break
        if parts:
            self._sender.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _encrypt(self, data: bytes, first: int | None = None) -> None:
        """
        Encrypt C{data} and send the records; C{first}: the result of an
        C{SSL_write} of C{data} already made (some bytes taken, or its error).
        """
        tls = self.connection
        sent = 0
        try:
            if first is not None:
                if first <= 0:
                    tls._raise_ssl_error(tls._ssl, first)
                else:
                    sent = first
            # The write BIO grows to take everything: one call, unless OpenSSL
            # stops at a record boundary (partial writes are enabled).
            while sent < len(data):
                sent += _send(tls, data[sent:] if sent else data)
        except WantReadError:
            # A renegotiation or a key change needs the peer's answer first.
            self._waiting.append(data[sent:])
            self._fast = False
            if self.producer is not None:
                self.producer.pauseProducing()
        except SSL.Error:
            self._failed(Failure())
            return
        self._flush()

    def _write_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._encrypt(b"".join(waiting))
        self._check_fast()
        if self._waiting or self._tls_over:
            return
        if self.producer is not None:
            self.producer.resumeProducing()
        elif self.disconnecting:
            self._shutdown()

    def _shutdown(self) -> None:
        """close_notify after what was written, then the TCP connection closes."""
        tls = self.connection
        self._tls_over = True
        self._fast = False
        try:
            tls.shutdown()
        except SSL.Error:
            pass  # mid-handshake, or the peer is gone: nothing to say
        self._flush()
        self.transport.loseConnection()

    def _peer_closed(self) -> None:
        # The peer's close_notify: ours in answer, then close.
        self._shutdown()

    def _failed(self, failure: Failure) -> None:
        if isinstance(failure.value, SSL.Error) and _represents_eof(failure.value):
            failure = Failure(error.ConnectionLost(_NO_CLOSE_NOTIFY))
        if self._reason is None:
            self._reason = failure
        self._tls_over = True
        self._fast = False
        if self.connection is not None and _pending_out(self.connection):
            self._flush()  # OpenSSL's alert
        self.transport.loseConnection()

    # --- the protocol's transport -------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._fast and not self.disconnecting and data:
            # The common case inline: one SSL_write, one BIO_read, one send.
            try:
                n = _SSL_write(self._ssl, data, len(data))  # bytes: cffi passes the pointer
            except TypeError:  # another buffer: through pyOpenSSL's copy
                self._encrypt(bytes(data))
                return
            if n == len(data):
                if n <= _SMALL_WRITE:
                    # Its records fit the scratch buffer: read them without asking
                    # how much there is (if it comes back full, there is more).
                    out = _BIO_read(self._from, _SCRATCH, _SCRATCH_SIZE)
                    if 0 < out < _SCRATCH_SIZE:
                        self._hold = False  # whatever was held went with it
                        self._sender.write(_unpack(_SCRATCH, out))
                        return
                    if out > 0:
                        self._sender.write(_unpack(_SCRATCH, out))
                self._flush()
                return
            self._encrypt(data, n)
            return
        if self._tls_over or (self.disconnecting and self.producer is None) or not data:
            return
        if not self.handshake_done or self._waiting:
            self._waiting.append(data)
            return
        self._encrypt(data)

    def writeSequence(self, parts) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        if not self.handshake_done and not self._waiting:
            self.abortConnection()  # no close_notify can be sent mid-handshake
            return
        self.disconnecting = True
        if not self._waiting and self.producer is None and not self._tls_over:
            self._shutdown()

    def abortConnection(self) -> None:
        self._aborted = True
        self.disconnecting = True
        self._tls_over = True
        self._fast = False
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        """TLS has no half-close: as L{loseConnection}."""
        self.loseConnection()

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is registered already")
        if self._tls_over:
            producer.stopProducing()
            return
        self.producer = producer
        if streaming and hasattr(self._sender, "set_producer"):
            # Registered with the TCP transport when a write is buffered.
            self._sender.set_producer(producer)
        else:
            self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is None:
            return
        self._sender.drop_producer(producer)
        if self.transport.producer is producer:
            self.transport.unregisterProducer()
        if self.disconnecting and not self._waiting and not self._tls_over:
            self._shutdown()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    @property
    def bufferSize(self) -> int:
        return self.transport.bufferSize

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        self.transport.bufferSize = size

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def getHandle(self) -> SSL.Connection | None:
        """The C{SSL.Connection}, as Twisted's TLS transports answer."""
        return self.connection

    def getPeerCertificate(self):
        return self.connection.get_peer_certificate() if self.connection is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        if self.connection is None:
            return None
        return self.connection.get_alpn_proto_negotiated() or None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def logPrefix(self) -> str:
        return "MemoryTLS"


def client_tls(transport, protocol, creator) -> MemoryTLS:
    """
    Start TLS as the client on C{transport} (connected, C{protocol} its
    protocol) with C{creator} (an C{IOpenSSLClientConnectionCreator}):
    C{protocol} sees the decrypted stream from now on, its C{transport} is
    the returned L{MemoryTLS}.  The ClientHello is sent at once.
    """
    end = MemoryTLS(protocol, transport)
    connection = creator.clientConnectionForTLS(end)
    connection.set_connect_state()
    transport.protocol = end
    protocol.transport = end
    end._start(connection, b"")
    return end


def server_tls(transport, connection: SSL.Connection, data: bytes = b"") -> MemoryTLS:
    """
    Start TLS as the server on C{transport} (connected) with C{connection}
    (an C{SSL.Connection} in accept state), fed first with C{data} (the
    ClientHello read so far): the transport's protocol sees the decrypted
    stream from now on, its C{transport} is the returned L{MemoryTLS}.
    """
    protocol = transport.protocol
    end = MemoryTLS(protocol, transport)
    end._server = True
    transport.protocol = end
    protocol.transport = end
    end._start(connection, data)
    return end
