"""
Log floods are rate-limited: a problem that repeats (a full access-log disk,
EMFILE, one upstream failing the same way for every request) produces one
line per interval with a count, not one line per occurrence.

Usage::

    throttle = LogThrottle(clock)
    throttle.emit(log.warn, "disk", "cannot write the access log: {error}", error=e)

The first occurrence of a key is logged at once; later ones within
C{interval} seconds are counted, and the next line for that key (when the
interval has passed) says how many were suppressed.  Nothing is logged by a
timer: a problem that stops simply stops producing lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

DEFAULT_INTERVAL = 10.0


class LogThrottle:
    """One log line per key per interval; the rest are counted."""

    __slots__ = ("_clock", "_interval", "_next", "_suppressed")

    def __init__(self, clock: IReactorTime, interval: float = DEFAULT_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, emitter: Callable[..., Any], key: str, fmt: str, **fields: Any) -> bool:
        """
        Log C{fmt} with C{fields} through C{emitter} (for example
        C{log.warn}) unless C{key} was logged less than an interval ago.
        A line that follows suppressed ones gains C{" ({suppressed} more
        like this in the last {interval}s)"}.  Returns whether it logged.
        """
        now = self._clock.seconds()
        if now < self._next.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._next[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            emitter(
                fmt + " ({suppressed} more like this in the last {interval:g}s)",
                suppressed=suppressed,
                interval=self._interval,
                **fields,
            )
        else:
            emitter(fmt, **fields)
        return True

    def suppressed(self, key: str) -> int:
        """How many occurrences of C{key} are counted but not yet logged."""
        return self._suppressed.get(key, 0)
