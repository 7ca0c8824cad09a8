"""
Recent problems: the upstream errors and rejections of a worker, with
time, client, destination and reason, for the status page.

L{watch_factory} hooks a port's protocol factory without adding work to a
request that has no problem:

  - the session relay ends every exchange in a record handed to the
    factory's record sink (C{factory.sink}); the record names the client,
    the destination and the reasons, so the sink is wrapped;
  - a factory without one (a TLS port's) is told the reason by its metrics
    object (C{upstream_error(reason)}, C{rejected(reason)}); a thin view in
    front of it points the factory's C{access_log} at a tee for the rest of
    that reactor turn, and the entry written then names client and
    destination (else they show as C{-}).

Nothing secret leaves: the destination is the URL's host and port only (no
user information, path or query), never a header.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs

#: Problems a worker keeps (and the master shows), newest last.
RECENT = 50

#: Problem kinds: which metric counted it.
UPSTREAM_ERROR = "upstream_error"
REJECTED = "rejected"
TLS_REJECTED = "tls_rejected"
#: A port stopped accepting for want of descriptors (tproxy_accept_paused_total).
ACCEPT_PAUSED = "accept_paused"

_LINE_PREFIX = "problem "


@attrs.frozen
class Problem:
    """One upstream error or rejection, as the status page shows it."""

    time: float  # Unix seconds
    port: str
    kind: str  # UPSTREAM_ERROR, REJECTED, TLS_REJECTED or ACCEPT_PAUSED
    reason: str  # the metric's reason label
    client: str = "-"
    destination: str = "-"  # host:port, never a path or query
    method: str = "-"
    status: int = 0  # what the client was answered; 0: nothing
    worker: int = 0  # the worker's index (set by the master)

    def to_json(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Problem:
        return cls(
            time=float(data["time"]),
            port=_text(data["port"]),
            kind=_text(data["kind"]),
            reason=_text(data["reason"]),
            client=_text(data.get("client", "-")),
            destination=_text(data.get("destination", "-")),
            method=_text(data.get("method", "-")),
            status=int(data.get("status", 0)),
            worker=int(data.get("worker", 0)),
        )


def _text(value: object, limit: int = 200) -> str:
    return str(value)[:limit]


def where(url: str, destination: str | None = None) -> str:
    """
    Where a request went, safe to show: C{host:port} of C{url} (no user
    information, path or query), else the upstream address, else C{-}.
    """
    if url and url != "-":
        if "://" not in url:
            url = "//" + url  # CONNECT: host:port
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port
        except ValueError:
            host, port = None, None
        if host:
            shown = f"[{host}]" if ":" in host else host
            return f"{shown}:{port}" if port else shown
    return destination or "-"


def encode(problem: Problem) -> str:
    """A status-pipe line (without its newline) carrying C{problem}."""
    return _LINE_PREFIX + json.dumps(problem.to_json(), separators=(",", ":"))


def decode(detail: str, worker: int) -> Problem | None:
    """The problem of a status line's detail (after C{problem }), or None if malformed."""
    try:
        return attrs.evolve(Problem.from_json(json.loads(detail)), worker=worker)
    except (ValueError, KeyError, TypeError):
        return None


class ProblemLog:
    """The last C{size} problems, oldest first."""

    def __init__(self, size: int = RECENT) -> None:
        self._problems: deque[Problem] = deque(maxlen=size)

    def add(self, problem: Problem) -> None:
        self._problems.append(problem)

    def recent(self) -> list[Problem]:
        return list(self._problems)

    def take(self) -> list[Problem]:
        """The problems not taken yet, oldest first; forgets them."""
        taken = list(self._problems)
        self._problems.clear()
        return taken


class _Tee:
    """The access log while a problem waits for its client: fills it in, passes the entry on."""

    def __init__(self, watch: _FactoryWatch) -> None:
        self._watch = watch

    def log(self, entry) -> None:
        watch = self._watch
        if watch.real_log is not None:
            watch.real_log.log(entry)
        watch.settle(entry)

    def __getattr__(self, name: str):
        # reopen/close, should anything call them while armed.
        return getattr(self._watch.real_log, name)


class _FactoryWatch:
    """The problems of one port factory, paired with the access-log entry that follows."""

    def __init__(self, factory, port: str, clock, sink: Callable[[Problem], None]) -> None:
        self.factory = factory
        self.port = port
        self.clock = clock
        self.sink = sink
        self.real_log = factory.access_log
        self.pending: list[tuple[float, str, str]] = []
        self._tee = _Tee(self)

    def problem(self, kind: str, reason: str) -> None:
        if not self.pending:
            self.real_log = self.factory.access_log
            self.factory.access_log = self._tee
            self.clock.callLater(0, self.settle, None)
        self.pending.append((self.clock.seconds(), kind, reason))

    def settle(self, entry) -> None:
        """Emit the pending problems, with what C{entry} (an AccessEntry or None) says."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        if self.factory.access_log is self._tee:
            self.factory.access_log = self.real_log
        for when, kind, reason in pending:
            if entry is None:
                self.sink(Problem(time=when, port=self.port, kind=kind, reason=reason))
            else:
                self.sink(
                    Problem(
                        time=when,
                        port=self.port,
                        kind=kind,
                        reason=reason,
                        client=_text(entry.client or "-"),
                        destination=_text(where(entry.url, entry.destination)),
                        method=_text(entry.method or "-", 20),
                        status=int(entry.status or 0),
                    )
                )


class _WatchedMetrics:
    """
    A port's metrics object with C{upstream_error} and C{rejected} also
    reported to a L{_FactoryWatch}.  Every other public attribute is copied
    from the real object once, so the relay's per-request calls cost the same.
    """

    def __init__(
        self,
        real,
        watch: _FactoryWatch | None,
        kinds: dict[str, str],
        reporter: Callable[[str], Callable[[str], None]] | None = None,
    ) -> None:
        for name in dir(real):
            if not name.startswith("_") and name not in kinds:
                setattr(self, name, getattr(real, name))
        for method, kind in kinds.items():
            tell = reporter(kind) if reporter is not None else _arming(watch, kind)
            setattr(self, method, _counting(getattr(real, method), tell))


def _arming(watch: _FactoryWatch, kind: str) -> Callable[[str], None]:
    return lambda reason: watch.problem(kind, reason)


def _counting(count: Callable[[str], None], tell: Callable[[str], None]):
    def report(reason: str) -> None:
        count(reason)
        tell(reason)

    return report


def _record_problem(record, port: str, kind: str, reason: str) -> Problem:
    """The problem an exchange record tells (the session relay's C{ExchangeRecord})."""
    address = record.destination
    if address is None:
        upstream = None
    elif ":" in address[0]:
        upstream = f"[{address[0]}]:{address[1]}"
    else:
        upstream = f"{address[0]}:{address[1]}"
    return Problem(
        time=record.finished,
        port=port,
        kind=kind,
        reason=reason,
        client=_text(record.client or "-"),
        destination=_text(where(record.url().decode("ascii", "replace"), upstream)),
        method=_text(record.method.decode("ascii", "replace"), 20),
        status=int(record.status),
    )


def _watch_records(factory, port: str, clock, tell: Callable[[Problem], None]) -> None:
    """
    L{watch_factory} for a factory with a record sink (the session relay):
    the sink is wrapped in a plain function (about 80 ns per exchange), and
    its metrics only tell the rejections made outside any record.
    """
    inside = [False]  # in a record: its metrics calls are told from the record itself

    def outside_records(kind: str) -> Callable[[str], None]:
        def report(reason: str) -> None:
            if not inside[0]:  # e.g. a connection turned away before any exchange
                tell(Problem(time=clock.seconds(), port=port, kind=kind, reason=reason))

        return report

    # Setting the metrics rebuilds the factory's sink around them: wrap that one.
    factory.metrics = _WatchedMetrics(
        factory.metrics,
        None,
        {"upstream_error": UPSTREAM_ERROR, "rejected": REJECTED},
        outside_records,
    )
    sink = factory.sink

    def watched_sink(record) -> None:
        inside[0] = True
        try:
            sink(record)
        finally:
            inside[0] = False
        if record.upstream_error is not None:
            tell(_record_problem(record, port, UPSTREAM_ERROR, record.upstream_error))
        if record.rejected is not None:
            tell(_record_problem(record, port, REJECTED, record.rejected))

    factory.sink = watched_sink


def watch_factory(factory, port: str, clock, sink: Callable[[Problem], None]) -> None:
    """
    Report the upstream errors and rejections of C{factory} (a port's
    protocol factory) to C{sink}.  Call before it builds protocols.

    A factory with a record sink (C{factory.sink}, called once per finished
    exchange with its record) is watched there: the record names the client
    and destination.  Otherwise (a TLS port's factory) its C{metrics} and
    C{tls_metrics} are watched, and the access-log entry that follows a
    problem in the same reactor turn names them.
    """
    if callable(getattr(factory, "sink", None)):
        _watch_records(factory, port, clock, sink)
        return
    watch = _FactoryWatch(factory, port, clock, sink)
    factory.metrics = _WatchedMetrics(
        factory.metrics, watch, {"upstream_error": UPSTREAM_ERROR, "rejected": REJECTED}
    )
    if getattr(factory, "tls_metrics", None) is not None:
        factory.tls_metrics = _WatchedMetrics(
            factory.tls_metrics, watch, {"rejected": TLS_REJECTED}
        )
