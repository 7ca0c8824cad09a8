"""
The master's view of the traffic: the summed metrics of every worker,
reduced to per-port totals (L{PortTotals}) and kept once a second for ten
minutes (L{History}), from which rates and sparklines are read.

Sans-IO: L{totals_from_samples} takes C{(name, labels, value)} triples, as
prometheus_client's collectors give them; L{History} takes a time and the
totals.  The series it reads are looked up by name, so a series that does
not exist (yet) simply counts as zero: TLS series, for instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import attrs

#: Seconds of history kept (one sample a second).
WINDOW = 600
#: How often the master samples, in seconds.
INTERVAL = 1.0

RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")


@attrs.define
class PortTotals:
    """Every counter of one port since the master started, and its open connections."""

    requests: float = 0.0
    responses: dict[str, float] = attrs.field(factory=lambda: dict.fromkeys(RESPONSE_CLASSES, 0.0))
    bytes_in: float = 0.0  # from clients
    bytes_out: float = 0.0  # to clients
    connections: float = 0.0  # accepted, ever
    connections_active: float = 0.0
    upstream_errors: dict[str, float] = attrs.field(factory=dict)
    rejected: dict[str, float] = attrs.field(factory=dict)
    tls_actions: dict[str, float] = attrs.field(factory=dict)
    tls_rejected: dict[str, float] = attrs.field(factory=dict)

    @property
    def errors(self) -> float:
        """Upstream errors and rejections (TLS ones included): the problems."""
        return (
            sum(self.upstream_errors.values())
            + sum(self.rejected.values())
            + sum(self.tls_rejected.values())
        )


def response_class(code: str) -> str:
    """C{"2xx"} for C{"204"}; C{"none"} when no answer was sent (code 0) or it is odd."""
    if len(code) == 3 and code[0] in "12345" and code.isdigit():
        return code[0] + "xx"
    return "none"


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


Sample = tuple[str, dict[str, str], float]


def totals_from_samples(samples: Iterable[Sample]) -> dict[str, PortTotals]:
    """Per-port totals from metric samples (name, labels, value)."""
    ports: dict[str, PortTotals] = {}

    def of(labels: dict[str, str]) -> PortTotals | None:
        name = labels.get("port")
        if name is None:
            return None
        totals = ports.get(name)
        if totals is None:
            totals = ports[name] = PortTotals()
        return totals

    for name, labels, value in samples:
        if name == "tproxy_requests_total":
            totals = of(labels)
            if totals is not None:
                totals.requests += value
                _add(totals.responses, response_class(labels.get("code", "")), value)
        elif name == "tproxy_bytes_total":
            totals = of(labels)
            if totals is not None:
                if labels.get("direction") == "in":
                    totals.bytes_in += value
                elif labels.get("direction") == "out":
                    totals.bytes_out += value
        elif name == "tproxy_connections_total":
            totals = of(labels)
            if totals is not None:
                totals.connections += value
        elif name == "tproxy_connections_active":
            totals = of(labels)
            if totals is not None:
                totals.connections_active += value
        elif name in _BY_REASON:
            totals = of(labels)
            if totals is not None:
                attribute, label = _BY_REASON[name]
                _add(getattr(totals, attribute), labels.get(label, "other"), value)
    return ports


_BY_REASON = {
    "tproxy_upstream_errors_total": ("upstream_errors", "reason"),
    "tproxy_rejected_total": ("rejected", "reason"),
    "tproxy_tls_connections_total": ("tls_actions", "action"),
    "tproxy_tls_rejected_total": ("tls_rejected", "reason"),
}


def samples_of(registry) -> Iterable[Sample]:
    """The samples of a prometheus_client registry, as L{totals_from_samples} takes them."""
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


@attrs.frozen
class Point:
    """What the history keeps of one port per sample."""

    time: float
    requests: float
    errors: float
    bytes_in: float
    bytes_out: float


class History:
    """
    Per-port samples, one per L{INTERVAL}, for the last L{WINDOW} seconds;
    the rates over any span inside it, and per-second series for sparklines.
    """

    def __init__(self, window: float = WINDOW, interval: float = INTERVAL) -> None:
        self.window = window
        self.interval = interval
        self._size = int(window / interval) + 1
        self._points: dict[str, deque[Point]] = {}
        self.latest: dict[str, PortTotals] = {}
        self.sampled_at: float | None = None

    def add(self, now: float, totals: dict[str, PortTotals]) -> None:
        self.latest = totals
        self.sampled_at = now
        for port, t in totals.items():
            points = self._points.get(port)
            if points is None:
                points = self._points[port] = deque(maxlen=self._size)
            points.append(Point(now, t.requests, t.errors, t.bytes_in, t.bytes_out))

    def ports(self) -> list[str]:
        return list(self._points)

    def rate(self, port: str, field: str, span: float) -> float:
        """
        Per second over the last C{span} seconds (or as much of it as is
        kept); 0 with fewer than two samples.  A counter that went down (a
        restart of its source) counts as 0, not as negative.
        """
        points = self._points.get(port)
        if not points or len(points) < 2:
            return 0.0
        last = points[-1]
        first = points[0]
        for point in points:
            if point.time >= last.time - span - self.interval / 2:
                first = point
                break
        elapsed = last.time - first.time
        if elapsed <= 0:
            return 0.0
        return max(0.0, getattr(last, field) - getattr(first, field)) / elapsed

    def series(self, port: str, field: str) -> list[float]:
        """Per-second rates between consecutive samples, oldest first (at most L{WINDOW})."""
        points = list(self._points.get(port, ()))
        out = []
        for before, after in zip(points, points[1:], strict=False):
            elapsed = after.time - before.time
            change = getattr(after, field) - getattr(before, field)
            out.append(max(0.0, change) / elapsed if elapsed > 0 else 0.0)
        return out
