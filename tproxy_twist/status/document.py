"""
The status document: what C{/status.json} returns, what C{/status} draws
and what C{tproxy-twist status} prints.  Its shape is documented in the
README ("Status"); L{SCHEMA} changes when a field changes meaning or goes.

Built from plain values (sans-IO), so the unit tests build it from a fake
supervisor and a hand-made history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from .history import RESPONSE_CLASSES, History
from .problems import Problem

#: The document's version; a client can refuse one it does not know.
SCHEMA = 1
#: Spans of the rates shown, in seconds, and their names in the document.
SPANS = {"10s": 10.0, "1m": 60.0}


@attrs.frozen
class PortInfo:
    """A configured port, as shown."""

    name: str
    mode: str
    listen: str
    protocol: str = "http"


@attrs.frozen
class WorkerInfo:
    """A worker process, as shown."""

    index: int
    pid: int | None
    generation: int
    state: str  # starting, ready, silent, draining
    started: float
    connections: int | None  # from its last heartbeat; None before the first
    rss_bytes: int | None
    restarts: int  # times a worker in this slot was replaced
    last_error: str = ""


@attrs.frozen
class Probe:
    """One start-up check the master made."""

    name: str
    ok: bool
    detail: str


@attrs.frozen
class MasterInfo:
    version: str
    pid: int
    started: float
    config_path: str
    config_loaded: float
    generation: int
    workers_wanted: int
    workers_ready: int
    last_reload: dict | None  # {"time", "result": ok|refused|failed|started, "detail"}
    probes: Sequence[Probe] = ()


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def _counts(table: dict[str, float]) -> dict[str, int]:
    return {key: int(value) for key, value in sorted(table.items())}


def port_entry(port: PortInfo, history: History) -> dict:
    totals = history.latest.get(port.name)
    entry: dict = {
        "name": port.name,
        "mode": port.mode,
        "protocol": port.protocol,
        "listen": port.listen,
    }
    if totals is None:  # no sample yet, or the port has no series
        from .history import PortTotals

        totals = PortTotals()
    entry["connections_active"] = int(totals.connections_active)
    entry["connections_total"] = int(totals.connections)
    entry["requests_total"] = int(totals.requests)
    entry["requests_per_second"] = {
        key: _round(history.rate(port.name, "requests", span)) for key, span in SPANS.items()
    }
    entry["errors_per_second"] = {
        key: _round(history.rate(port.name, "errors", span)) for key, span in SPANS.items()
    }
    entry["responses"] = {c: int(totals.responses.get(c, 0)) for c in RESPONSE_CLASSES}
    entry["bytes_total"] = {"in": int(totals.bytes_in), "out": int(totals.bytes_out)}
    entry["bytes_per_second"] = {
        "in": _round(history.rate(port.name, "bytes_in", SPANS["10s"]), 1),
        "out": _round(history.rate(port.name, "bytes_out", SPANS["10s"]), 1),
    }
    entry["upstream_errors"] = _counts(totals.upstream_errors)
    entry["rejected"] = _counts(totals.rejected)
    if totals.tls_actions or totals.tls_rejected or port.protocol == "tls":
        entry["tls"] = {
            "actions": _counts(totals.tls_actions),
            "rejected": _counts(totals.tls_rejected),
        }
    else:
        entry["tls"] = None
    entry["history"] = {
        "interval": history.interval,
        "requests_per_second": [_round(v, 2) for v in history.series(port.name, "requests")],
        "errors_per_second": [_round(v, 2) for v in history.series(port.name, "errors")],
    }
    return entry


def worker_entry(worker: WorkerInfo, now: float) -> dict:
    return {
        "index": worker.index,
        "pid": worker.pid,
        "generation": worker.generation,
        "state": worker.state,
        "uptime": _round(max(0.0, now - worker.started), 1),
        "connections": worker.connections,
        "rss_bytes": worker.rss_bytes,
        "restarts": worker.restarts,
        "last_error": worker.last_error[:300],
    }


def build(
    *,
    now: float,
    master: MasterInfo,
    ports: Iterable[PortInfo],
    history: History,
    workers: Iterable[WorkerInfo],
    problems: Iterable[Problem],
) -> dict:
    """The status document (JSON-ready: only dicts, lists, str, int, float, bool, None)."""
    return {
        "schema": SCHEMA,
        "time": _round(now),
        "sampled": _round(history.sampled_at) if history.sampled_at is not None else None,
        "master": {
            "version": master.version,
            "pid": master.pid,
            "uptime": _round(max(0.0, now - master.started), 1),
            "started": _round(master.started),
            "config": master.config_path,
            "config_loaded": _round(master.config_loaded),
            "generation": master.generation,
            "workers_wanted": master.workers_wanted,
            "workers_ready": master.workers_ready,
            "last_reload": master.last_reload,
            "probes": [attrs.asdict(p) for p in master.probes],
        },
        "ports": [port_entry(p, history) for p in ports],
        "workers": [worker_entry(w, now) for w in workers],
        "problems": [p.to_json() for p in reversed(list(problems))],
    }
