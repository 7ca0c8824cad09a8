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
"""

from __future__ import annotations

import errno

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()


class WorkerReactor(EPollReactor):
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
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                log.failure("handling an I/O event failed")

    doIteration = doPoll


def install() -> WorkerReactor:
    from twisted.internet.main import installReactor

    reactor = WorkerReactor()
    installReactor(reactor)
    return reactor
