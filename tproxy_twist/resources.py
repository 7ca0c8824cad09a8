"""
Open files: every relayed connection holds two descriptors (the client's and
the upstream one), so C{limits.max_connections} must fit in RLIMIT_NOFILE.

At start the master and every worker raise the soft limit to the hard limit.
When C{max_connections} × 2 plus a margin still does not fit, the proxy runs
with a lower effective C{max_connections} (the one that fits) and says so, with
the numbers and the fix, rather than refusing to start: a worker at its
connection limit stops accepting (new connections wait in the kernel's queue)
until one closes, whereas a worker out of descriptors would fail requests.
"""

from __future__ import annotations

import resource

import attrs

#: Descriptors a worker needs besides its connections: listeners, pipes to the
#: master, the epoll descriptor, the access log, metrics files, DNS, the interpreter.
MARGIN = 64


@attrs.frozen
class Capacity:
    configured: int  # limits.max_connections
    effective: int  # what fits in the open-file limit
    open_files: int  # the soft RLIMIT_NOFILE after raising it

    @property
    def lowered(self) -> bool:
        return self.effective < self.configured

    def warning(self) -> str:
        """What the operator reads when the limit was lowered."""
        return (
            f"limits.max_connections = {self.configured} needs"
            f" {self.configured * 2 + MARGIN} open files per worker, but the limit"
            f" (RLIMIT_NOFILE) is {self.open_files}: each worker takes at most"
            f" {self.effective} connections.  Raise the limit (LimitNOFILE= in the"
            f" systemd unit, `ulimit -n`) or lower max_connections"
        )


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have; capacity() reports what it allows
    return soft


def capacity(max_connections: int, open_files: int) -> Capacity:
    """How many connections fit in C{open_files} descriptors (at least one)."""
    fits = max(1, (open_files - MARGIN) // 2)
    return Capacity(max_connections, min(max_connections, fits), open_files)


def connection_capacity(max_connections: int) -> Capacity:
    """L{raise_open_files_limit}, then L{capacity} for this process."""
    return capacity(max_connections, raise_open_files_limit())
