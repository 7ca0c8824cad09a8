"""
The access log: one entry per request, handed over by the relay when the
request is finished (answered by the origin or by the proxy itself).

L{SquidFormatter} writes Squid's native C{access.log} line, so the tools
that read Squid's logs read ours; L{JSONFormatter} writes one JSON object
per line.  L{FileAccessLog} appends the lines to a file from a writer
thread of its own: the reactor thread only formats a line and queues it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .logthrottle import LogThrottle

if TYPE_CHECKING:
    from .config import AccessLogConfig

__all__ = [
    "AccessEntry",
    "AccessLog",
    "FileAccessLog",
    "JSONFormatter",
    "SquidFormatter",
    "formatter_for",
    "open_access_log",
]

log = Logger()


@attrs.define(slots=True)
class AccessEntry:
    """What the relay knows about one finished request."""

    time: float  # when it finished, Unix seconds
    duration: float  # seconds from its head to the end of its answer
    client: str  # the client's IP address
    port: str  # the configured port's name
    mode: str  # tproxy, forward or intercept
    method: str
    url: str  # absolute: http://host/path, or host:port for CONNECT
    status: int  # 0 when no answer could be sent (the client went away first)
    bytes_out: int  # bytes sent to the client for this request, head included
    bytes_in: int  # bytes received from the client for this request
    destination: str | None  # "ip:port" (or "[ip]:port") the upstream connection went to
    result: str  # Squid's result code: TCP_MISS, TCP_TUNNEL, TCP_DENIED, NONE
    content_type: str  # of the answer, "-" when none
    user: str | None = None  # the proxy-authenticated user (forward ports with auth)
    # TLS ports only (None elsewhere, and left out of JSON lines): what the ClientHello said.
    sni: str | None = None
    alpn: str | None = None  # the offered protocols, comma-separated
    tls_version: str | None = None  # the highest version offered, e.g. "TLSv1.3"
    ech: bool | None = None  # an encrypted_client_hello extension was present
    # What the TLS port did: splice, bump, deny, tunnel, terminate or close.
    action: str | None = None


_TLS_FIELDS = frozenset({"sni", "alpn", "tls_version", "ech", "action"})


class AccessLog(Protocol):
    def log(self, entry: AccessEntry) -> None: ...


class Formatter(Protocol):
    def __call__(self, entry: AccessEntry) -> str:
        """One line for C{entry}, without its newline."""


# --- formats -------------------------------------------------------------------------


def _field(text: str) -> str:
    """A field that must stay one whitespace-free token: percent-encode what would split it."""
    # Checked in C first (every line has several fields): printable ASCII
    # without space or "%" is exactly the characters 33-126 but "%".
    if text.isascii() and text.isprintable() and " " not in text and "%" not in text:
        return text or "-"
    if not text:
        return "-"
    return "".join(c if 33 <= ord(c) <= 126 and c != "%" else f"%{ord(c):02X}" for c in text)


def _last_field(text: str) -> str:
    """The last field may hold spaces (Squid writes Content-Type as it came), never a line break."""
    if not text:
        return "-"
    if text.isascii() and text.isprintable() and "%" not in text:
        return text  # the characters 32-126 but "%": nothing to encode
    return "".join(c if 32 <= ord(c) <= 126 and c != "%" else f"%{ord(c):02X}" for c in text)


def destination_ip(destination: str | None) -> str | None:
    """The IP of C{"ip:port"} or C{"[ip]:port"}."""
    if not destination:
        return None
    if destination.startswith("["):
        return destination[1 : destination.find("]")]
    return destination.rpartition(":")[0] or destination


class SquidFormatter:
    """
    Squid's native format, C{logformat squid %ts.%03tu %6tr %>a %Ss/%03>Hs
    %<st %rm %ru %[un %Sh/%<a %mt}::

        1700000000.123    250 198.51.100.2 TCP_MISS/200 1432 GET http://example.com/ -
            HIER_DIRECT/203.0.113.2 text/html

    (one line in the file).  Time (seconds.milliseconds, when the request finished), elapsed
    milliseconds, client, result/status, bytes sent to the client, method,
    URL, user (the authenticated proxy user, else C{-}), hierarchy/server
    (C{HIER_NONE/-} when the proxy answered without an upstream), content type.
    """

    def __call__(self, entry: AccessEntry) -> str:
        millis = math.floor(entry.time * 1000)
        server = destination_ip(entry.destination)
        hierarchy = f"HIER_DIRECT/{server}" if server else "HIER_NONE/-"
        return (
            f"{millis // 1000:9d}.{millis % 1000:03d} {round(entry.duration * 1000):6d}"
            f" {_field(entry.client)} {_field(entry.result)}/{entry.status:03d}"
            f" {entry.bytes_out} {_field(entry.method)} {_field(entry.url)}"
            f" {_field(entry.user) if entry.user else '-'}"
            f" {hierarchy} {_last_field(entry.content_type)}"
        )


class JSONFormatter:
    """
    One JSON object per line with every field of L{AccessEntry}, under its
    own name; the TLS fields (C{sni}, C{alpn}, C{tls_version}, C{ech}, C{action}) only
    for connections on TLS ports.
    """

    def __call__(self, entry: AccessEntry) -> str:
        if entry.tls_version is None:
            fields = attrs.asdict(entry, filter=lambda a, v: a.name not in _TLS_FIELDS)
        else:
            fields = attrs.asdict(entry)
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=True)


def formatter_for(format: str) -> Formatter:
    """C{"squid"} or C{"json"} (the values of C{[access_log] format})."""
    if format == "squid":
        return SquidFormatter()
    if format == "json":
        return JSONFormatter()
    raise ValueError(f"unknown access log format {format!r}: use squid or json")


# --- the file --------------------------------------------------------------------------

# Lines waiting for the writer.  At ~200 bytes a line this bounds the queue
# to ~20 MB: if the disk stalls for long, lines are dropped (and counted)
# rather than letting memory grow without limit or blocking the reactor.
DEFAULT_MAX_QUEUED = 100_000
# One write(2) at most this big, always whole lines: several worker processes
# append to the same file, and O_APPEND keeps each write's lines together.
_WRITE_CHUNK = 64 * 1024
# With a flush_interval, once a line waits the writer lets more gather for that
# long before it writes (unless BATCH_LINES have queued, or close/reopen is
# asked): two thread wake-ups per interval instead of one per request.  Measured
# in bench/README.md ("Added latency"): a wake-up per line costs a worker about
# 4 more time slices and 25-40 % more CPU per request at 800 requests/s.  Off by
# default: the workers' lines then no longer reach the shared file in the order
# their requests ended (each worker holds its own for up to the interval).
FLUSH_INTERVAL = 0.0
BATCH_LINES = 1024


class FileAccessLog:
    """
    Appends one line per L{AccessEntry} to C{path}, without ever touching
    the disk in the reactor thread.

    C{log()} formats the line and appends it to an in-memory queue; a
    dedicated writer thread takes whatever has queued up and writes it with
    C{os.write} on an C{O_APPEND} descriptor, whole lines per call.  A
    single writer keeps lines in order.  The writer is woken by the first
    line after it went idle (or by C{batch_lines} queued lines); with a
    C{flush_interval} (seconds, 0 by default) it then lets lines gather that
    long before writing them all: a line reaches the file at most about
    C{flush_interval} after its request ended, and a busy worker pays two
    thread wake-ups per interval rather than one per request, but lines of
    several workers sharing a file are only ordered per worker.  When the
    queue is full (the disk
    has stalled), new lines are dropped; when a write fails (a full disk),
    its lines are lost.  Both are counted in C{dropped} and reported to
    C{on_dropped(n)}, and logged at most once per C{LogThrottle} interval
    with a count, however many lines are lost.

    The file is opened in the constructor (start-up, before the reactor
    runs and before privileges are dropped), so a bad path is an error
    the operator sees at once.  C{reopen()} (SIGUSR1, after logrotate
    moved the file) makes the writer open C{path} afresh before its next
    write.  C{close()} writes every queued line, closes the file and returns
    a L{Deferred} that fires when that is done; later entries are ignored.
    """

    def __init__(
        self,
        path: str,
        format: str = "squid",
        reactor=None,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        formatter: Formatter | None = None,
        on_dropped: Callable[[int], None] | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        batch_lines: int = BATCH_LINES,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self._format = formatter or formatter_for(format)
        self._max_queued = max_queued
        self._flush_interval = flush_interval
        self._batch_lines = batch_lines
        #: The writer thread: "idle" (waiting for a first line: log() wakes it),
        #: "gathering" (letting lines gather for flush_interval) or "writing".
        self.writer_state = "writing"
        self._fd = self._open()
        self._queue: deque[str] = deque()
        self._wake = threading.Condition()
        self._reopen = False
        self._closing = False
        self._finished = False  # the writer has closed the file (set in the reactor thread)
        self._waiting: list[Deferred[None]] = []
        self._throttle = LogThrottle(reactor)
        self._on_dropped = on_dropped
        self.dropped = 0  # lines lost: the queue was full, or their write failed
        self._thread = threading.Thread(target=self._writer, name=f"access-log {path}", daemon=True)
        self._thread.start()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    # --- the reactor thread's side ---

    def log(self, entry: AccessEntry) -> None:
        line = self._format(entry) + "\n"
        with self._wake:
            if self._closing:
                return
            queued = len(self._queue)
            full = queued >= self._max_queued
            if not full:
                self._queue.append(line)
                if self.writer_state == "idle" or queued + 1 == self._batch_lines:
                    self.writer_state = "gathering"
                    self._wake.notify()
        if full:
            self._lost(1)
            self._throttle.emit(
                log.warn,
                "queue-full",
                "access log {path}: the disk is not keeping up; dropping lines",
                path=self.path,
            )

    def _lost(self, lines: int) -> None:
        self.dropped += lines
        if self._on_dropped is not None:
            self._on_dropped(lines)

    def _write_failed(self, error: str, lines: int) -> None:
        self._lost(lines)
        self._throttle.emit(
            log.error,
            "write:" + error,
            "access log {path}: write failed ({error}); lines lost",
            path=self.path,
            error=error,
        )

    def reopen(self) -> None:
        """Open C{path} again before the next write (logrotate moved it away)."""
        with self._wake:
            self._reopen = True
            self._wake.notify()

    def close(self) -> Deferred[None]:
        """Write what is queued, close the file; the Deferred fires when done."""
        closed: Deferred[None] = Deferred()
        with self._wake:
            self._closing = True
            self._wake.notify()
            if not self._finished:
                self._waiting.append(closed)
                return closed
        closed.callback(None)
        return closed

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the writer to finish after L{close} (for a synchronous stop)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the writer thread ---

    def _writer(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._reopen and not self._closing:
                    self.writer_state = "idle"
                    self._wake.wait()
                if self._hold():
                    # Let lines gather; close(), reopen() or a full batch end it early.
                    self.writer_state = "gathering"
                    self._wake.wait(self._flush_interval)
                self.writer_state = "writing"
                lines = list(self._queue)
                self._queue.clear()
                reopen, self._reopen = self._reopen, False
                closing = self._closing
            if reopen:
                self._reopen_file()
            if lines:
                self._write(lines)
            if closing:  # log() queues nothing once _closing is set
                os.close(self._fd)
                self._reactor.callFromThread(self._done)
                return

    def _hold(self) -> bool:
        """Whether the writer should wait for more lines first (called holding the lock)."""
        return (
            len(self._queue) < self._batch_lines
            and not self._reopen
            and not self._closing
            and self._flush_interval > 0
        )

    def _done(self) -> None:
        with self._wake:
            self._finished = True
            waiting, self._waiting = self._waiting, []
        for closed in waiting:
            closed.callback(None)

    def _reopen_file(self) -> None:
        try:
            fd = self._open()
        except OSError as e:
            # Keep writing to the file we have: losing lines is worse.
            self._reactor.callFromThread(
                log.error,
                "access log {path}: cannot reopen ({error}); still writing to the old file",
                path=self.path,
                error=e.strerror,
            )
            return
        old, self._fd = self._fd, fd
        os.close(old)

    def _write(self, lines: list[str]) -> None:
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > _WRITE_CHUNK:
                self._write_all("".join(chunk).encode("utf-8", "replace"), len(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write_all("".join(chunk).encode("utf-8", "replace"), len(chunk))

    def _write_all(self, data: bytes, lines: int) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                why = e.strerror or errno.errorcode.get(e.errno, str(e))
                self._reactor.callFromThread(self._write_failed, why, lines)
                return
            view = view[written:]


def open_access_log(config: AccessLogConfig, reactor=None) -> FileAccessLog | None:
    """
    The access log C{[access_log]} asks for, or C{None} when C{path} is
    unset.  Its queued lines are written before the reactor shuts down
    (a "before shutdown" trigger waits for L{FileAccessLog.close}).
    Raises C{OSError} when the file cannot be opened.
    """
    if not config.path:
        return None
    if reactor is None:
        from twisted.internet import reactor
    from .metrics import ACCESS_LOG_DROPPED

    access_log = FileAccessLog(
        config.path,
        config.format,
        reactor,
        on_dropped=ACCESS_LOG_DROPPED.inc,
        flush_interval=config.flush_interval,
    )
    reactor.addSystemEventTrigger("before", "shutdown", access_log.close)
    return access_log
