"""
The master's status board: samples the summed metrics once a second into
the L{History} (a L{task.LoopingCall} on the master's reactor: a page
request only reads what is there), keeps the workers' recent problems, and
builds the status document on request.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import task
from twisted.logger import Logger

from . import document
from .history import INTERVAL, History, PortTotals, samples_of, totals_from_samples
from .problems import ProblemLog

log = Logger()

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None) -> int | None:
    """The resident set size of C{pid} (from /proc/PID/statm), or None when it is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * _PAGE_SIZE


def startup_probes(config, capacity=None) -> list[document.Probe]:
    """
    The start-up checks, as the status page shows them: the transparent
    bind per family a tproxy port serves (Squid's start-up test), and the
    open-file capacity.
    """
    from ..preflight import FAMILY_NAMES, families
    from ..sockets import probe_transparent_bind

    probes = []
    for family in families(config):
        error = probe_transparent_bind(family)
        name = f"{FAMILY_NAMES[family]} transparent bind"
        if error is None:
            detail = "a transparent socket can bind a foreign address"
        else:
            detail = f"{error.strerror or error} (errno {error.errno})"
        probes.append(document.Probe(name, error is None, detail))
    if capacity is not None:
        detail = f"{capacity.effective} connections per worker"
        probes.append(
            document.Probe(
                "open files",
                not capacity.lowered,
                capacity.warning() if capacity.lowered else detail,
            )
        )
    return probes


class StatusBoard(Service):
    """
    What C{/status} and C{/status.json} show.

    @ivar history: the sampled per-port totals.
    @ivar problems: the last upstream errors and rejections the workers told.
    @ivar probes: the start-up checks (set by the master when it starts).
    """

    name = "status"

    def __init__(self, master, metrics_dir: Path, reactor, version: str) -> None:
        from prometheus_client import CollectorRegistry, multiprocess

        self.master = master
        self.reactor = reactor
        self.version = version
        self.started: float | None = None  # when the master started serving
        self.history = History()
        self.problems = ProblemLog()
        self.probes: list[document.Probe] = []
        self._registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self._registry, path=str(metrics_dir))
        self._sampler = task.LoopingCall(self.sample)
        self._sampler.clock = reactor

    def startService(self) -> None:
        super().startService()
        self.started = self.reactor.seconds()
        self._sampler.start(INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._sampler.running:
            self._sampler.stop()

    def sample(self) -> None:
        """Read the summed metrics once (a scrape's work) into the history."""
        try:
            totals = totals_from_samples(samples_of(self._registry))
        except Exception:  # a half-written file must not stop the sampling
            log.failure("status: sampling the metrics failed")
            return
        for port in self.master.supervisor.config.ports:
            # Before its workers wrote anything, a port is at zero: its first
            # requests are then a rise, not the start of its history.
            totals.setdefault(port.name, PortTotals())
        self.history.add(self.reactor.seconds(), totals)

    def document(self) -> dict:
        supervisor = self.master.supervisor
        config = supervisor.config
        now = self.reactor.seconds()
        ports = [
            document.PortInfo(p.name, p.mode, str(p.listen), getattr(p, "protocol", "http"))
            for p in config.ports
        ]
        master = document.MasterInfo(
            version=self.version,
            pid=os.getpid(),
            started=self.started if self.started is not None else now,
            config_path=str(self.master.config.path),
            config_loaded=supervisor.config_loaded or now,
            generation=supervisor.generation,
            workers_wanted=supervisor.worker_count,
            workers_ready=supervisor.ready_count(),
            last_reload=supervisor.last_reload,
            probes=tuple(self.probes),
        )
        return document.build(
            now=now,
            master=master,
            ports=ports,
            history=self.history,
            workers=worker_infos(supervisor),
            problems=self.problems.recent(),
        )


def worker_infos(supervisor) -> list[document.WorkerInfo]:
    """The workers of the serving generation, then those starting or draining."""
    seen = []
    for worker in supervisor.current.values():
        seen.append(worker)
    for worker in (supervisor.pending or {}).values():
        seen.append(worker)
    seen.extend(sorted(supervisor.retired, key=lambda w: (w.generation, w.index)))
    infos = []
    for worker in seen:
        if worker.state == "exited":
            continue
        state = "silent" if worker.silent and worker.state == "ready" else worker.state
        infos.append(
            document.WorkerInfo(
                index=worker.index,
                pid=worker.pid,
                generation=worker.generation,
                state=state,
                started=worker.started,
                connections=worker.connections,
                rss_bytes=rss_bytes(worker.pid),
                restarts=supervisor.restarts.get(worker.index, 0),
                last_error=worker.last_error,
            )
        )
    return infos
