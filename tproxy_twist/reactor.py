"""
The workers' reactor: Twisted's epoll reactor, minus the logging context it
sets up around every I/O event.

EPollReactor.doPoll wraps each read or write event in log.callWithLogger,
which builds a context dict ({"system": logPrefix()}) and pushes and pops it
for the benefit of legacy log.msg callers that read the "system" from the
context.  Nothing in a worker does (our log events carry their own
namespace), and a relayed request is several events, so the wrapper costs a
few percent of a worker's time.  This overrides doPoll, an internal method
of Twisted's EPollReactor (stable since Twisted 10): the only place that
does; _doReadOrWrite still turns exceptions in a connection into a logged
error and a closed connection, as before.

While it handles a batch of events (what one C{epoll_wait} returned) the
sockets' L{tproxy_twist.sockets.DirectWriter}s hold what they are given, and
the batch's end sends it (L{tproxy_twist.sockets.hold_writes}): a peer is
woken once per batch rather than once per event.  Beyond
C{HELD_WRITERS} sockets holding bytes, they are sent mid-batch.

Hooks that save C{epoll_ctl} calls on every new connection; they read the
epoll reactor's registrations (C{_reads}, C{_writes}, C{_selectables}) and
are used only where the reactor has them (anything else takes Twisted's
public calls):

  - L{WorkerReactor.hand_over_reader}: another selectable of the same file
    descriptor takes over a read registration (a L{SplicePump} taking a
    socket from its transport: no C{DEL} and C{ADD});
  - L{WorkerReactor.add_reader_and_writer}: a connecting socket is watched
    for both with one C{epoll_ctl(ADD)} (L{tproxy_twist.sockets}: the
    upstream connector; Twisted's C{addReader} and C{addWriter} take an
    C{ADD} and a C{MOD});
  - L{WorkerReactor.set_interest}: reading and writing changed together
    with one C{epoll_ctl}, and L{WorkerReactor.forget}: no C{DEL} for a
    socket that is closed right after (a L{SplicePump}'s sockets).
"""

from __future__ import annotations

import errno
from select import EPOLLIN, EPOLLOUT

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

from .logthrottle import LogThrottle
from .sockets import HELD_WRITERS, hold_writes, release_writes, send_held

log = Logger()


class WorkerReactor(EPollReactor):
    def __init__(self) -> None:
        super().__init__()
        # What escapes _doReadOrWrite (a bug in the loop itself, or in a
        # connection's connectionLost) is logged, and the batch goes on; met on
        # every event it must not flood the log: one line per interval, counted.
        self._event_failures = LogThrottle(self)

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        held = hold_writes()  # sent when the batch is handled (sockets.DirectWriter)
        try:
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    handle(selectable, fd, event)
                except Exception:
                    self._event_failures.emit(
                        log.failure, "io-event", "handling an I/O event failed"
                    )
                if len(held) >= HELD_WRITERS:
                    send_held(held)
        finally:
            release_writes(held)

    doIteration = doPoll

    def hand_over_reader(self, old, new) -> bool:
        """
        If C{old} is registered for reading only, make C{new} (a selectable
        of the same file descriptor) the one that gets its events from now
        on, without a system call, and return C{True}; otherwise change
        nothing and return C{False}.
        """
        fd = old.fileno()
        if fd in self._reads and fd not in self._writes and self._selectables.get(fd) is old:
            self._selectables[fd] = new
            return True
        return False

    def add_reader_and_writer(self, selectable) -> None:
        """
        Watch C{selectable} for reading and writing: one C{epoll_ctl(ADD)} for a
        descriptor not registered yet, where C{addReader} and C{addWriter}
        take an C{ADD} and a C{MOD}.
        """
        fd = selectable.fileno()
        if fd in self._reads or fd in self._writes:
            self.addReader(selectable)
            self.addWriter(selectable)
            return
        self._poller.register(fd, EPOLLIN | EPOLLOUT)
        self._reads.add(fd)
        self._writes.add(fd)
        self._selectables[fd] = selectable

    def set_interest(self, selectable, reading: bool, writing: bool) -> None:
        """
        Watch C{selectable} for exactly these events, with at most one
        C{epoll_ctl} (C{ADD}, C{MOD} or C{DEL}), where Twisted's C{addReader},
        C{removeWriter} and so on take one each.
        """
        fd = selectable.fileno()
        reads, writes = self._reads, self._writes
        was_reading, was_writing = fd in reads, fd in writes
        if reading == was_reading and writing == was_writing:
            if reading or writing:
                self._selectables[fd] = selectable
            return
        mask = (EPOLLIN if reading else 0) | (EPOLLOUT if writing else 0)
        if not (was_reading or was_writing):
            self._poller.register(fd, mask)
            self._selectables[fd] = selectable
        elif mask:
            self._poller.modify(fd, mask)
            self._selectables[fd] = selectable
        else:
            self._poller.unregister(fd)
            del self._selectables[fd]
        if reading:
            reads.add(fd)
        else:
            reads.discard(fd)
        if writing:
            writes.add(fd)
        else:
            writes.discard(fd)

    def forget(self, selectable) -> None:
        """
        Drop C{selectable}'s registrations without a system call, for a
        descriptor that its owner closes right after (closing a socket
        removes it from epoll; left open, its events would find no
        selectable).  A descriptor registered for another selectable is
        left be.
        """
        fd = selectable.fileno()
        if self._selectables.get(fd) is selectable:
            del self._selectables[fd]
            self._reads.discard(fd)
            self._writes.discard(fd)


def install() -> WorkerReactor:
    from twisted.internet.main import installReactor

    reactor = WorkerReactor()
    installReactor(reactor)
    return reactor
