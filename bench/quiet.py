"""How much CPU everything outside the benchmark used while a path was measured.

On a 2-core machine any other busy process (a test suite, a build) takes CPU
from the proxy, wrk or nginx and skews the figures. :class:`OtherLoad` samples
the CPU time of every process that is neither the benchmark itself nor inside
the lab's namespaces, so the report can say when a figure is not to be trusted.
Processes that both start and end between two samples are missed, and kernel
threads are left out (softirq threads do the lab's own packet work): it is a
warning light, not an accounting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

__all__ = ["OtherLoad"]

_TICK = os.sysconf("SC_CLK_TCK")
_PF_KTHREAD = 0x00200000


def _netns_inode(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class OtherLoad:
    """CPU seconds used outside the lab between :meth:`start` and :meth:`stop`."""

    def __init__(self, namespaces: Iterable[str]) -> None:
        self._ours = set()
        for ns in namespaces:
            try:
                self._ours.add(f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]")
            except OSError:
                pass
        self._me = os.getpid()
        self._before: dict[tuple[int, str], float] = {}
        self._started = 0.0

    def _sample(self) -> dict[tuple[int, str], float]:
        ticks: dict[tuple[int, str], float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == self._me:
                continue
            if _netns_inode(f"/proc/{entry.name}/ns/net") in self._ours:
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[6]: flags; kernel threads (ksoftirqd…) also do our own packets' work.
            if int(fields[6]) & _PF_KTHREAD:
                continue
            # fields[11], [12]: utime, stime; [19]: start time (tells a reused pid apart)
            ticks[(int(entry.name), fields[19])] = (int(fields[11]) + int(fields[12])) / _TICK
        return ticks

    def start(self) -> None:
        self._before = self._sample()
        self._started = time.monotonic()

    def stop(self) -> dict:
        """``{"cpu_seconds", "seconds", "share"}``: share of all CPUs used by others."""
        after = self._sample()
        elapsed = time.monotonic() - self._started
        used = sum(t - self._before.get(key, 0.0) for key, t in after.items())
        cpus = os.cpu_count() or 1
        return {
            "cpu_seconds": round(used, 2),
            "seconds": round(elapsed, 1),
            "share": used / (elapsed * cpus) if elapsed > 0 else 0.0,
        }
