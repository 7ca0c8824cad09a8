"""
Zero-copy byte streams: relay two connected TCP sockets with C{splice(2)}
through a pipe, the bytes never entering Python.

A L{SplicePump} takes two Twisted TCP transports that are already connected
(a client and its upstream), takes both out of Twisted's reading and
writing, and moves bytes both ways itself:

  - each socket is watched by one small descriptor of ours in the reactor
    (Twisted's epoll reactor allows one selectable per file descriptor);
  - readable source: C{splice(source → pipe)}, then C{splice(pipe → destination)};
  - backpressure: when the destination takes no more (EAGAIN), the source is no
    longer read until the destination is writable again, so no more than one
    pipe's worth of bytes is ever held per direction;
  - half-close: an EOF from one side becomes C{shutdown(SHUT_WR)} towards the
    other once everything before it was delivered; the other direction goes on;
  - when both directions have ended, or either side fails (a reset), the
    owner is told once, with the reason, and both transports are closed: at
    once after a clean end (both FINs exchanged, nothing left to write: the
    protocols' C{connectionLost} with C{ConnectionDone} follows the owner's
    C{on_end} in the same call), after a failure with a reset on both, also
    in the same call (C{connectionLost} with C{ConnectionAborted});
  - byte counts per direction and the time of the last transfer are
    attributes the owner reads (metrics, access log, idle timeout sweep);
    L{SplicePump.abort} ends it early (drain on reload, timeouts).

Pipes come from a small per-process L{PipePool}: a direction takes one only
while bytes sit in it, so an idle spliced connection holds no pipe, and a
busy one usually returns its pipe within the same event.

A L{SpliceTransfer} is the one-shot, one-way sibling: exactly N bytes from
a source transport to a sink (the rest of an HTTP response body with a
Content-Length), the sink's Twisted-buffered bytes first and never a byte
beyond N, then both transports are handed back to their owner unread and
open, for the next exchange on the same connections.

Where C{splice} is not possible the pump copies instead (C{recv_into} and
C{send} through a buffer of its own, the same state machine): when
C{os.splice} is missing or the kernel answers EINVAL.  Transports that are
not plain TCP (TLS, test fakes) cannot be pumped at all: L{can_splice} says
so, and the owner keeps relaying through Twisted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .logthrottle import LogThrottle
from .sockets import connect_error_for

log = Logger()

#: Bytes moved per splice call (one pipe's worth at most).
CHUNK = 1 << 20
#: Pipe capacity asked for (F_SETPIPE_SZ); the kernel caps it at
#: /proc/sys/fs/pipe-max-size (1 MiB by default).
PIPE_SIZE = 1 << 20
#: Transfers per readiness event before other connections get a turn.
_ROUNDS = 16
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_HAVE_SPLICE = hasattr(os, "splice")
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
#: A pipe cannot be made now: the bytes go through user space instead.
_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
#: At most this much is read at once when copying (recv allocates what it asks
#: for): also what a copied stream holds in user space at most per direction
#: while its destination is full.
_COPY_CHUNK = 1 << 18

#: Reasons L{SplicePump} gives its owner when it ends.
DONE = "done"  # both sides sent their EOF and everything was delivered
CONNECT_FAILED = "connect_failed"  # the upstream socket's connect failed (connect_failure says why)
RESET = "reset"  # a side failed (reset, broken pipe, other socket error)
ABORTED = "aborted"  # the owner called abort()


class PipePool:
    """
    Pipes for splicing, reused: creating one costs three system calls and a
    resize.  Holds at most C{keep} idle pipes; the rest are closed.
    """

    def __init__(self, keep: int = 64, size: int = PIPE_SIZE) -> None:
        self._idle: list[tuple[int, int]] = []
        self._keep = keep
        self._size = size
        #: pipes handed out and not returned yet
        self.in_use = 0
        #: times no pipe could be made (the bytes were copied instead)
        self.shortages = 0

    def take(self) -> tuple[int, int] | None:
        """A pipe, or C{None} when none can be made now (out of descriptors or memory)."""
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in _SHORTAGE:
                raise
            self.shortages += 1
            return None
        self.in_use += 1
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
        except OSError:
            pass  # over the user's pipe allowance: the default 64 KiB pipe still works
        return r, w

    def give_back(self, pipe: tuple[int, int], empty: bool) -> None:
        """Return a pipe; one that may still hold bytes is closed, never reused."""
        self.in_use -= 1
        if empty and len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._idle:
            r, w = self._idle.pop()
            os.close(r)
            os.close(w)


_shortage_log: LogThrottle | None = None


def _pipe_shortage(clock: IReactorTime) -> None:
    """Out of descriptors for a pipe: said once per 10 s (with a count), not per read."""
    global _shortage_log
    if _shortage_log is None:
        _shortage_log = LogThrottle(clock)
    _shortage_log.emit(
        log.warn,
        "pipe",
        "cannot make a pipe for splice(2) ({error}): copying through user space meanwhile;"
        " the worker is short of file descriptors (RLIMIT_NOFILE)",
        error="out of file descriptors or memory",
    )


_default_pool: PipePool | None = None


def default_pool() -> PipePool:
    global _default_pool
    if _default_pool is None:
        _default_pool = PipePool()
    return _default_pool


# --- Twisted's private transport state ---------------------------------------------
# A pump needs the transport's socket and whatever Twisted still buffers for it
# (abstract.FileDescriptor's dataBuffer, offset, _tempDataBuffer, _tempDataLen and
# the _write* flags).  This and sockets.DirectWriter are the only places that read
# them; tests/unit/test_twisted_internals.py fails loudly if they move.


def can_splice(transport: object) -> bool:
    """
    Can this transport be pumped?  Only a connected plain TCP transport of the
    POSIX reactors that is not closing, half-closed, or speaking TLS.
    """
    return _open_plain_tcp(transport) and transport.producer is None


def _open_plain_tcp(transport: object) -> bool:
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
    )


def can_splice_body(source: object, sink: object) -> bool:
    """
    Can a L{SpliceTransfer} move bytes from C{source} to C{sink}?  Both must be
    open plain TCP transports (producers registered on them may stay: the
    transfer leaves them be), and the source must have nothing of its own
    waiting to be written (its socket is the transfer's while it runs).
    """
    return (
        _open_plain_tcp(source)
        and _open_plain_tcp(sink)
        and not source._tempDataLen
        and len(source.dataBuffer) <= source.offset
    )


def _take_buffered(transport: tcp.Connection) -> bytes:
    """What Twisted has not written yet; the transport's buffer is left empty."""
    data = transport.dataBuffer[transport.offset :]
    if transport._tempDataLen:
        data = bytes(data) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return bytes(data)


def _close_now(transport: tcp.Connection) -> None:
    """
    Close a transport whose connection ended cleanly both ways, now: its
    protocol's C{connectionLost} is called with L{ConnectionDone}, as after
    C{loseConnection}.  A transport already closed or being aborted is left be.
    """
    if transport.disconnected or getattr(transport, "socket", None) is None:
        return
    if transport._aborting:
        return  # its own connectionLost(ConnectionAborted) is on the way
    # Both FINs were exchanged: shutdown() would only fail with ENOTCONN.
    transport._shouldShutdown = False
    transport.connectionLost(_CONNECTION_DONE)


def _abort_now(transport: tcp.Connection) -> None:
    """
    C{abortConnection}, now rather than from the next reactor turn: the
    socket is closed with a reset and the protocol's C{connectionLost} is
    called with L{ConnectionAborted} before this returns.  (Twisted's own
    defers it through C{callLater(0)}: a timer per socket, about 3 % of a
    spliced connection that ends in a reset, which is how most browser
    connections end.)  A transport already closed or being aborted is left be.
    """
    if transport.disconnected or transport._aborting or getattr(transport, "socket", None) is None:
        return
    transport._aborting = True
    transport.connectionLost(_CONNECTION_ABORTED)


def _closes_now(end: _End) -> bool:
    """Whether L{SplicePump._finish} closes this end's socket (see L{_close_now}, L{_abort_now})."""
    transport = end.transport
    if transport is None:
        return True  # a raw socket of the pump's own
    return not (
        transport.disconnected or transport._aborting or getattr(transport, "socket", None) is None
    )


#: One failure for every clean end, as Twisted's reactor shares its own.
_CONNECTION_DONE = Failure(ConnectionDone())
_CONNECTION_ABORTED = Failure(ConnectionAborted())


@implementer(IReadWriteDescriptor)
class _End:
    """One socket of a pump, as the reactor sees it while the pump owns it."""

    __slots__ = ("pump", "fd", "sock", "transport", "source", "sink", "reading", "writing")

    def __init__(
        self, pump: SplicePump, transport: tcp.Connection | None, sock: socket.socket | None = None
    ) -> None:
        self.pump: SplicePump | SpliceTransfer | None = pump  # None once the pump let go
        self.transport = transport  # None: a raw socket of the pump's own
        self.sock: socket.socket = transport.socket if transport is not None else sock
        self.fd = self.sock.fileno()
        self.source: _Direction | None = None  # the direction this socket feeds
        self.sink: _Direction | None = None  # the direction that writes to it
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "SplicePump"

    def doRead(self) -> None:
        pump = self.pump
        if pump is not None:
            pump._readable(self)

    def doWrite(self) -> None:
        pump = self.pump
        if pump is not None:
            pump._writable(self)

    def connectionLost(self, reason) -> None:
        # Only the reactor calls this: an error or hang-up on a socket we were
        # not reading (a refused connect, too), or the reactor shutting down.
        self.reading = self.writing = False
        pump = self.pump
        if pump is not None:
            pump._lost(self, reason.getErrorMessage())

    def let_go(self) -> None:
        """The pump ended: no reference back to it or its directions (no cycle for the GC)."""
        self.pump = self.source = self.sink = None


class _Direction:
    """Bytes from one socket to the other: a pipe (or buffer) and its state."""

    __slots__ = (
        "src", "dst", "pipe", "held", "pending", "eof", "ended", "moved", "copy", "drained"
    )  # fmt: skip

    def __init__(self, src: _End, dst: _End, pending: bytes, copy: bool) -> None:
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.held = 0  # bytes in the pipe not yet delivered
        self.pending = pending  # bytes to deliver before anything else (Twisted's, or copied)
        self.eof = False  # the source sent its EOF
        self.ended = False  # ... and the destination was shut down for writing
        self.moved = 0  # bytes read from the source
        self.copy = copy  # copy through user space instead of splicing
        # The last read got less than it asked for: the source is most likely
        # empty until its next readiness event, so another read now would only
        # cost a system call that answers EAGAIN.
        self.drained = False


class SplicePump:
    """
    Relays bytes between two connected TCP transports with splice(2), or
    with C{copy=True} through user space (C{recv} + C{send}, at most
    L{_COPY_CHUNK} held per direction; the TLS and HTTP layers pass the
    port's C{stream_relay}).

    The owner builds it, checks L{can_splice} for both transports first, and
    calls L{start}.  From then on neither transport may be written to or read
    from by anyone else; the owner ends it early with L{abort} only.  When it
    ends, C{on_end(reason)} is called exactly once (L{DONE}, L{RESET} or
    L{ABORTED}): after a reset or an abort right after both transports were
    told to abort (their protocols' C{connectionLost} follows from Twisted);
    after L{DONE} just before both are closed, in the same call.
    C{on_eof(transport)} (optional) is called when a side sends its EOF.

    C{b} may instead be a raw socket whose non-blocking C{connect()} is under
    way (L{tproxy_twist.sockets.open_upstream}): no Twisted transport at all
    for the upstream side of a splice.  The pump then watches it for the
    connect's end; C{on_connected()} is called when it is connected, just
    before C{to_b} (the bytes read from C{a} so far: a ClientHello) is sent
    to it, ahead of everything else.  Meanwhile C{a} is not read, only
    watched: a reset ends the pump (L{RESET}: the connect is called off),
    data or an EOF wait in the kernel.  A failed connect ends it with
    L{CONNECT_FAILED} (C{connect_failure}: Twisted's error for the errno).
    The pump closes such a socket itself when it ends: plainly after L{DONE},
    as an abort otherwise (the owner never sees it).
    """

    def __init__(
        self,
        a: tcp.Connection,
        b: tcp.Connection | socket.socket,
        *,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        on_end: Callable[[str], None],
        on_eof: Callable[[tcp.Connection], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        to_b: bytes = b"",
        pool: PipePool | None = None,
        copy: bool = not _HAVE_SPLICE,
    ) -> None:
        self._reactor = reactor
        # The worker reactor changes both interests with one epoll_ctl, and
        # drops a socket about to be closed without any.
        self._set_interest = getattr(reactor, "set_interest", None)
        self._forget = getattr(reactor, "forget", None)
        self._clock = clock
        self._on_end = on_end
        self._on_eof = on_eof
        self._on_connected = on_connected
        self._pool = pool if pool is not None else default_pool()
        self._a = _End(self, a)
        raw = isinstance(b, socket.socket)
        self._b = _End(self, None, b) if raw else _End(self, b)
        self._to_b = to_b
        #: the raw upstream socket's connect is under way
        self.connecting = raw
        #: after L{CONNECT_FAILED}: why (Twisted's connect error for the errno)
        self.connect_failure: Exception | None = None
        self._copy = copy
        self._forward: _Direction | None = None
        self._backward: _Direction | None = None
        #: C{None} while running, then the reason it ended
        self.ended: str | None = None
        #: after a L{RESET}: which socket failed, in the system's words
        self.failure: str | None = None
        #: the clock's time of the last byte moved either way (for idle timeouts)
        self.last_activity = clock.seconds()

    @property
    def a_to_b(self) -> int:
        """Bytes read from C{a} (and relayed to C{b}) so far."""
        return self._forward.moved if self._forward is not None else 0

    @property
    def b_to_a(self) -> int:
        """Bytes read from C{b} (and relayed to C{a}) so far."""
        return self._backward.moved if self._backward is not None else 0

    @property
    def held(self) -> int:
        """
        Bytes read from one side and not delivered to the other yet: at most a
        pipe's worth each way (plus what Twisted had buffered at the start).
        """
        return sum(len(d.pending) + d.held for d in (self._forward, self._backward) if d)

    def start(self) -> None:
        a, b = self._a, self._b
        hand_over = getattr(self._reactor, "hand_over_reader", None)
        for end in (a, b):
            transport = end.transport
            if transport is None:
                continue
            # A transport that is reading only hands its registration to our end
            # (no epoll_ctl DEL and ADD): the worker reactor can; others cannot.
            if hand_over is not None and hand_over(transport, end):
                end.reading = True
            else:
                transport.stopWriting()
                transport.stopReading()
        # What Twisted still buffered for one side is the first thing that
        # direction delivers.
        to_b = self._to_b if b.transport is None else _take_buffered(b.transport)
        self._to_b = b""
        self._forward = _Direction(a, b, to_b, self._copy)
        self._backward = _Direction(b, a, _take_buffered(a.transport), self._copy)
        a.source = b.sink = self._forward
        b.source = a.sink = self._backward
        if self.connecting:
            # Until the connect ends: the socket watched for writing (its end,
            # errors included), the client only for a reset.
            self._watch(a, True, False)
            self._watch(b, False, True)
            return
        self._run_both()

    def _run_both(self) -> None:
        for d in (self._forward, self._backward):
            if d.pending:
                self._run(d)
                if self.ended is not None:
                    return
            else:
                # No read attempt now: epoll is level-triggered and reports
                # whatever is already waiting (two system calls fewer per stream).
                self._watch(d.src, True, d.src.writing)

    def abort(self) -> None:
        """End now: both connections are reset (drain timeout, idle timeout)."""
        if self.ended is None:
            self._finish(ABORTED)

    # --- readiness ------------------------------------------------------------------

    def _readable(self, end: _End) -> None:
        direction = end.source
        if self.ended is None and end.reading and direction is not None:
            if self.connecting:
                self._client_while_connecting(end)
            else:
                self._run(direction)

    def _writable(self, end: _End) -> None:
        direction = end.sink
        if self.ended is None and end.writing and direction is not None:
            if self.connecting:
                self._connect_ended()
            else:
                self._run(direction)

    def _lost(self, end: _End, why: str) -> None:
        """The reactor saw an error or hang-up on a socket we were not reading."""
        if self.connecting and end is self._b:
            self._connect_ended()  # a refused connect: SO_ERROR says why
        else:
            self._fail(end, why)

    # --- the raw upstream socket's connect ----------------------------------------------

    def _client_while_connecting(self, a: _End) -> None:
        """The client is readable while the upstream connects: a reset ends it all."""
        try:
            a.sock.recv(1, socket.MSG_PEEK)
        except _WOULD_BLOCK:
            return
        except OSError as e:
            self._fail(a, os.strerror(e.errno) if e.errno else str(e))
            return
        # Data or an EOF: it waits in the kernel until the upstream is connected.
        self._watch(a, False, False)

    def _connect_ended(self) -> None:
        self.connecting = False
        a, b = self._a, self._b
        err = b.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_failure = connect_error_for(err)
            self._finish(CONNECT_FAILED)
            return
        # Reading from both from now on.  A client still watched had nothing to
        # say yet (level-triggered epoll would have told): no read attempt now.
        self._forward.drained = a.reading
        self._watch(b, True, False)
        if self._on_connected is not None:
            self._on_connected()
        if self.ended is None:
            self._run_both()

    def _watch(self, end: _End, reading: bool, writing: bool) -> None:
        if reading == end.reading and writing == end.writing:
            return
        set_interest = self._set_interest
        if set_interest is not None:
            end.reading = reading
            end.writing = writing
            set_interest(end, reading, writing)
            return
        reactor = self._reactor
        if reading != end.reading:
            end.reading = reading
            (reactor.addReader if reading else reactor.removeReader)(end)
        if writing != end.writing:
            end.writing = writing
            (reactor.addWriter if writing else reactor.removeWriter)(end)

    # --- moving bytes ------------------------------------------------------------------

    def _run(self, d: _Direction) -> None:
        """Move what can be moved now; then watch for what unblocks the rest."""
        try:
            for _ in range(_ROUNDS):
                if not self._deliver(d):
                    # The destination is full: stop reading the source until it drains.
                    self._watch(d.dst, d.dst.reading, True)
                    self._watch(d.src, False, d.src.writing)
                    return
                if d.eof:
                    self._end_direction(d)
                    return
                if d.drained or not self._fill(d):
                    break
            else:
                # Still readable, but let other connections have their turn.  What
                # the last round read waits for the destination's next writable
                # event: the source may have nothing more to say.
                if d.held or d.pending:
                    self._watch(d.dst, d.dst.reading, True)
                    self._watch(d.src, False, d.src.writing)
                    return
        except OSError as e:
            self._fail(d.src, os.strerror(e.errno) if e.errno else str(e))
            return
        d.drained = False
        if self.ended is None:
            self._watch(d.dst, d.dst.reading, False)
            self._watch(d.src, not d.eof, d.src.writing)

    def _fill(self, d: _Direction) -> bool:
        """Read from the source; False when nothing more is there for now."""
        n = self._take_in(d, CHUNK)
        if n is None:
            return False
        if n == 0:
            d.eof = True
            self._release_pipe(d)
            if self._on_eof is not None:
                self._on_eof(d.src.transport)
            return True
        d.moved += n
        self.last_activity = self._clock.seconds()
        return True

    def _take_in(self, d: _Direction, want: int) -> int | None:
        """
        Read up to C{want} bytes from the direction's source into its pipe
        (or, copying, at most L{_COPY_CHUNK} into C{pending}): how many (0 at
        its EOF), or C{None} when nothing is there for now; C{drained} says
        whether the read got less than it asked for.  A socket that turns out
        not to be spliceable (EINVAL) is copied from then on; when no pipe can
        be had (out of descriptors), this read is copied; other errors are
        raised.
        """
        if not d.copy:
            if d.pipe is None:
                d.pipe = self._pool.take()
                if d.pipe is None:
                    _pipe_shortage(self._clock)
                    return self._copy_in(d, want)
            try:
                n = os.splice(d.src.fd, d.pipe[1], want, flags=_SPLICE_FLAGS)
            except _WOULD_BLOCK:
                self._release_pipe(d)
                return None
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Not spliceable after all: copy from now on.
                self._release_pipe(d)
                d.copy = True
            else:
                d.held += n
                d.drained = n < want
                return n
        return self._copy_in(d, want)

    def _copy_in(self, d: _Direction, want: int) -> int | None:
        """Read up to C{want} (at most L{_COPY_CHUNK}) bytes into C{pending} (user space)."""
        want = min(want, _COPY_CHUNK)
        try:
            data = d.src.sock.recv(want)
        except _WOULD_BLOCK:
            return None
        d.pending = data
        n = len(data)
        d.drained = n < want
        return n

    def _deliver(self, d: _Direction) -> bool:
        """Write what the direction holds; False if the destination is full."""
        if d.pending:
            try:
                sent = d.dst.sock.send(d.pending)
            except _WOULD_BLOCK:
                return False
            d.pending = d.pending[sent:]
            if d.pending:
                return False
        while d.held:
            try:
                n = os.splice(d.pipe[0], d.dst.fd, d.held, flags=_SPLICE_FLAGS)
            except _WOULD_BLOCK:
                return False
            d.held -= n
        self._release_pipe(d)
        return True

    def _release_pipe(self, d: _Direction) -> None:
        if d.pipe is not None and not d.held:
            self._pool.give_back(d.pipe, empty=True)
            d.pipe = None

    def _end_direction(self, d: _Direction) -> None:
        """The source's EOF, everything before it delivered: shut the destination's writing."""
        if not d.ended:
            d.ended = True
            other = self._backward if d is self._forward else self._forward
            # The last direction to end needs no shutdown(): both sockets are
            # closed at once below, and the close sends the destination's FIN
            # (nothing is left unread on it: its own EOF was read already).
            if not other.ended:
                try:
                    d.dst.sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self._fail(d.dst, os.strerror(e.errno) if e.errno else str(e))
                    return
        if self._forward.ended and self._backward.ended:
            self._finish(DONE)  # unwatches both (or lets their close do it)
            return
        self._watch(d.src, False, d.src.writing)
        self._watch(d.dst, d.dst.reading, False)

    # --- the end --------------------------------------------------------------------------

    def _fail(self, end: _End, why: str) -> None:
        if self.ended is None:
            # Kept, not logged: a reset is an everyday end (a closed browser tab),
            # and a line per connection would flood the log under load.
            self.failure = f"fd {end.fd}: {why}"
            self._finish(RESET)

    def _finish(self, reason: str) -> None:
        self.ended = reason
        # A socket closed below leaves epoll with its close: no epoll_ctl(DEL) for
        # it (the worker reactor forgets it then); the others are unwatched now.
        closing = self._forget is not None
        for end in (self._a, self._b):
            if not (closing and _closes_now(end)):
                self._watch(end, False, False)
        for d in (self._forward, self._backward):
            if d is not None and d.pipe is not None:
                self._pool.give_back(d.pipe, empty=not d.held)
                d.pipe = None
        if reason != DONE:
            # A reset: the owner is told, then both sockets are closed with a reset.
            try:
                self._on_end(reason)
            finally:
                self._close_ends(abort=True)
            return
        # Both directions were shut down for writing and both EOFs read; Twisted's
        # buffers are empty.  loseConnection() would register each socket for
        # writing to close it from the next loop iteration (two epoll_ctl and a
        # shutdown() that fails with ENOTCONN per socket): close both now, the
        # owner told first, as Twisted would, with connectionLost(ConnectionDone).
        try:
            self._on_end(reason)
        finally:
            self._close_ends(abort=False)

    def _close_ends(self, abort: bool) -> None:
        """
        Close both sockets now: a raw one of the pump's own with close(), a
        transport with L{_abort_now} or, after L{DONE}, L{_close_now}.
        """
        for end in (self._a, self._b):
            self._unwatch_for_close(end)
            if end.transport is None:
                end.sock.close()
            elif abort:
                _abort_now(end.transport)
            else:
                _close_now(end.transport)
        # Nothing refers back to the pump from here on: it, its ends and its
        # owner (through these callbacks) are freed by reference counting, not
        # left to the cyclic GC.  Byte counts stay readable.
        for end in (self._a, self._b):
            end.let_go()
        self._on_end = self._on_eof = self._on_connected = None

    def _unwatch_for_close(self, end: _End) -> None:
        """Take an end out of the reactor just before its socket is closed (or left be)."""
        if not (end.reading or end.writing):
            return
        if self._forget is not None and _closes_now(end):
            end.reading = end.writing = False
            self._forget(end)
        else:
            self._watch(end, False, False)  # the owner closed it meanwhile: Twisted will


# --- one-shot transfers: a body of known length ---------------------------------------

#: Reasons a L{SpliceTransfer} ends with, besides L{DONE}.
SHORT = "short"  # the source sent its EOF before the whole length
SOURCE_FAILED = "source_failed"  # reading from the source failed (a reset)
SINK_FAILED = "sink_failed"  # writing to the sink failed (its reader went away)


class SpliceTransfer:
    """
    Moves exactly C{length} bytes from one connected TCP transport (the
    source) to another (the sink) with splice(2), then hands both back: a
    body whose length the owner knows (an HTTP response's Content-Length),
    after which both connections go on under Twisted.

    The owner checks L{can_splice_body} first and calls L{start}.  From then
    until the end neither transport may be read from or written to by anyone
    else: the transfer takes both out of Twisted's reading and writing, and
    what Twisted still buffered for the sink is delivered first.  Nothing
    beyond C{length} is read from the source.  When it ends, the transfer's
    own reactor registrations are gone and neither transport is reading,
    writing or closed: C{on_end(reason)} is called exactly once, with L{DONE}
    (every byte delivered), L{SHORT}, L{SOURCE_FAILED} or L{SINK_FAILED}, and
    the owner decides what comes next (resume reading both, or close them).
    L{abort} stops it early without calling C{on_end} (the owner knows why).
    """

    def __init__(
        self,
        source: tcp.Connection,
        sink: tcp.Connection,
        length: int,
        *,
        reactor: IReactorFDSet,
        clock: IReactorTime,
        on_end: Callable[[str], None],
        pool: PipePool | None = None,
        copy: bool = not _HAVE_SPLICE,
    ) -> None:
        self._reactor = reactor
        self._set_interest = getattr(reactor, "set_interest", None)  # see SplicePump
        self._clock = clock
        self._on_end = on_end
        self._pool = pool if pool is not None else default_pool()
        self._source = _End(self, source)
        self._sink = _End(self, sink)
        self._copy = copy
        self._d: _Direction | None = None
        #: bytes to move in all
        self.length = length
        self._left = length  # bytes still to read from the source
        #: C{None} while running, then the reason it ended (L{ABORTED} after L{abort})
        self.ended: str | None = None
        #: after L{SOURCE_FAILED} or L{SINK_FAILED}: which socket, in the system's words
        self.failure: str | None = None
        #: the clock's time of the last byte moved (for idle timeouts)
        self.last_activity = clock.seconds()

    @property
    def moved(self) -> int:
        """Bytes read from the source so far (C{length} once it ended with L{DONE})."""
        return self.length - self._left

    @property
    def held(self) -> int:
        """Bytes read and not delivered yet (at most a pipe's worth, plus Twisted's buffer)."""
        d = self._d
        return 0 if d is None else len(d.pending) + d.held

    def start(self) -> None:
        source, sink = self._source, self._sink
        for end in (source, sink):
            end.transport.stopReading()
            end.transport.stopWriting()
        d = self._d = _Direction(source, sink, _take_buffered(sink.transport), self._copy)
        # Its buffer is empty now: whatever paused the sink's producer is over.
        sink.transport.producerPaused = False
        source.source = sink.sink = d
        if d.pending or not self._left:
            self._run()
        else:
            self._watch(source, True, False)

    def abort(self) -> None:
        """Stop now (timeouts, the owner closing): C{on_end} is not called."""
        if self.ended is None:
            self._on_end = None
            self._stop(ABORTED)

    # --- readiness (the reactor calls these through L{_End}) --------------------------

    def _readable(self, end: _End) -> None:
        if self.ended is None and end.reading:
            self._run()

    def _writable(self, end: _End) -> None:
        if self.ended is None and end.writing:
            self._run()

    def _fail(self, end: _End, why: str) -> None:
        if self.ended is None:
            self.failure = f"fd {end.fd}: {why}"  # kept, not logged (see SplicePump._fail)
            self._finish(SOURCE_FAILED if end is self._source else SINK_FAILED)

    def _lost(self, end: _End, why: str) -> None:
        self._fail(end, why)

    _watch = SplicePump._watch

    # --- moving bytes ------------------------------------------------------------------

    def _run(self) -> None:
        d = self._d
        source, sink = self._source, self._sink
        for _ in range(_ROUNDS):
            if not self._deliver(d):
                if self.ended is None:
                    # The sink is full: read no more until it drains.
                    self._watch(source, False, False)
                    self._watch(sink, False, True)
                return
            if not self._left:
                self._finish(DONE)
                return
            if d.eof:
                self._finish(SHORT)
                return
            if d.drained:
                break
            if not self._fill(d):
                if self.ended is not None:
                    return
                break
        else:
            # Other connections' turn; what the last round read goes out when
            # the sink is writable next (the source may have nothing more).
            self._watch(source, False, False)
            self._watch(sink, False, True)
            return
        d.drained = False
        self._watch(sink, False, False)
        self._watch(source, True, False)

    def _fill(self, d: _Direction) -> bool:
        """Read from the source (never beyond C{length}); False when nothing more is there."""
        want = min(CHUNK, self._left)
        try:
            n = self._take_in(d, want)
        except OSError as e:
            self._fail(d.src, os.strerror(e.errno) if e.errno else str(e))
            return False
        if n is None:
            return False
        if n == 0:
            d.eof = True
            self._release_pipe(d)
            return True
        d.moved += n
        self._left -= n
        self.last_activity = self._clock.seconds()
        return True

    def _deliver(self, d: _Direction) -> bool:
        """Write what is held; False if the sink is full (or failed)."""
        try:
            return SplicePump._deliver(self, d)
        except OSError as e:
            self._fail(d.dst, os.strerror(e.errno) if e.errno else str(e))
            return False

    _release_pipe = SplicePump._release_pipe
    _take_in = SplicePump._take_in
    _copy_in = SplicePump._copy_in

    # --- the end --------------------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        self.ended = reason
        for end in (self._source, self._sink):
            self._watch(end, False, False)
            end.let_go()  # no cycle through the ends for the GC (see SplicePump)
        d = self._d
        if d is not None and d.pipe is not None:
            self._pool.give_back(d.pipe, empty=not d.held)
            d.pipe = None

    def _finish(self, reason: str) -> None:
        on_end, self._on_end = self._on_end, None
        self._stop(reason)
        on_end(reason)
