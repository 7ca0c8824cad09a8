"""
The master: spawns and supervises the workers, reloads and stops them
without losing requests, and serves the metrics of all of them.

It never listens on a proxy port itself: a socket in a SO_REUSEPORT group
that nobody accepts on would still get its share of connections.

Workers are fresh interpreters (C{python -m tproxy_twist.worker}), never
forks of this process: a fork would share the reactor's epoll descriptor.
Each worker reports its state on a pipe (fd 3: "ready", "draining",
"failed <reason>", and "alive" every second as a heartbeat) and its log
events as JSON lines on stdout, which the master re-emits into its own log
with the worker's index as the system.  The master holds the write end of
each worker's stdin open and never writes to it: when the master dies, the
workers read end-of-file and exit.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer, error, task
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import config as configuration
from .config import Config, ListenAddress
from .logthrottle import LogThrottle

log = Logger()

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT = 30.0  # a new generation must be ready within this
_STEADY = 5.0  # a worker that ran this long before dying is respawned at once
_MAX_BACKOFF = 30.0
#: A ready worker silent for this long (three missed heartbeats) is not ready.
HEARTBEAT_TIMEOUT = 3.0
_HEARTBEAT_CHECK = 1.0

#: The exit status of a master that could not start (see L{MasterService.fail}).
EXIT_START_FAILED = 1


class WorkerProcess(ProcessProtocol):
    """One worker as the master sees it."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, generation: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.generation = generation
        self.state = "starting"  # -> ready -> draining; "exited" at the end
        self.was_ready = False
        self.silent = False  # its heartbeat stopped: not ready until it speaks again
        self.pid: int | None = None
        self.started = supervisor.reactor.seconds()
        self.last_heard = self.started
        self.last_error = ""
        self.connections: int | None = None  # open, as its last heartbeat said
        self._buffers = {1: b"", 2: b"", 3: b""}

    def connectionMade(self) -> None:
        # stdin stays open, unwritten: it closes when this process dies.
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 3:
            self.last_heard = self.supervisor.reactor.seconds()
        lines = (self._buffers.get(fd, b"") + data).split(b"\n")
        self._buffers[fd] = lines.pop()
        for line in lines:
            if fd == 1:
                self._log_event(line)
            elif fd == 3:
                self.supervisor.worker_reported(self, line.decode("utf-8", "replace").strip())
            elif line.strip():
                text = line.decode("utf-8", "replace")
                self.last_error = text
                log.error("worker {index}: {text}", index=self.index, text=text)

    def _log_event(self, line: bytes) -> None:
        line = line.strip(b"\x1e \r")
        if not line:
            return
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except (ValueError, json.JSONDecodeError):
            log.info("worker {index}: {text}", index=self.index, text=line.decode(errors="replace"))
            return
        event["log_system"] = f"worker {self.index}"
        level = event.get("log_level")
        if level is not None and level.name in ("critical", "error"):
            try:
                from twisted.logger import formatEvent

                self.last_error = formatEvent(event)
            except Exception:  # a malformed event must not break supervision
                pass
        globalLogPublisher(event)

    def processEnded(self, reason) -> None:
        self.state = "exited"
        value = reason.value
        if isinstance(value, error.ProcessDone):
            how = "exited normally"
        elif getattr(value, "signal", None):
            how = f"was killed by signal {value.signal}"
        else:
            how = f"exited with status {getattr(value, 'exitCode', '?')}"
        self.supervisor.worker_exited(self, how)

    def signal(self, number: int) -> None:
        try:
            self.transport.signalProcess(number)
        except error.ProcessExitedAlready:
            pass

    @property
    def serving(self) -> bool:
        """Ready, and its heartbeat is current."""
        return self.state == "ready" and not self.silent


class WorkerSupervisor(Service):
    """
    Keeps C{config.workers} workers of the current generation running.

    A worker of the current generation that dies is replaced (at once when
    it had run steadily, else with exponential back-off), except at start:
    when every worker of the first generation failed before any was ready,
    the problem is permanent (a port taken, a bad access-log path), and
    C{on_fatal} is called with the reasons instead of retrying forever.

    Reloads coalesce: a reload asked for while a generation is starting
    waits for it, and then brings up the latest configuration.  Workers of a
    superseded generation are always drained (SIGTERM), never killed, so a
    request they have accepted is answered.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        reactor,
        metrics_dir: Path,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.metrics_dir = metrics_dir
        self.reactor = reactor
        self.on_fatal = on_fatal
        self.generation = 0
        self.current: dict[int, WorkerProcess] = {}
        self.retired: set[WorkerProcess] = set()  # draining or replaced
        self.pending: dict[int, WorkerProcess] | None = None  # a generation coming up
        self._pending_config: Config | None = None
        self._queued_config: Config | None = None  # a reload waiting for the pending one
        self._pending_timer = None
        self._failures: dict[int, int] = {}
        self._respawns: dict[int, object] = {}
        self._stopping: defer.Deferred | None = None
        self._ever_ready = False
        self._first_failures: dict[int, str] = {}
        self._heartbeat = task.LoopingCall(self._check_heartbeats)
        self._heartbeat.clock = reactor
        self._last_check = 0.0
        self._throttle = LogThrottle(reactor)
        # For the status page (tproxy_twist.status).
        self.restarts: dict[int, int] = {}  # replacements per worker slot
        self.config_loaded: float | None = None  # when the serving configuration was read
        self.last_reload: dict | None = None  # {"time", "result", "detail"}
        self.on_problem: Callable[[object], None] | None = None  # a worker told a problem

    # --- counts --------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        return self.config.workers or os.cpu_count() or 1

    def all_ready(self) -> bool:
        return len(self.current) == self.worker_count and all(
            w.serving for w in self.current.values()
        )

    def ready_count(self) -> int:
        return sum(w.serving for w in self.current.values())

    def unresponsive(self) -> list[WorkerProcess]:
        """Workers of the current generation whose heartbeat stopped."""
        return [w for w in self.current.values() if w.silent and w.state == "ready"]

    def _update_gauge(self) -> None:
        from .metrics import WORKERS, WORKERS_NOT_READY

        ready = self.ready_count()
        WORKERS.set(ready)
        WORKERS_NOT_READY.set(self.worker_count - ready)

    # --- start ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.generation = 1
        self.config_loaded = self.reactor.seconds()
        snapshot = self._snapshot(self.config, self.generation)
        log.info("starting {n} worker(s), generation {g}", n=self.worker_count, g=self.generation)
        for index in range(1, self.worker_count + 1):
            self.current[index] = self._spawn(index, self.generation, snapshot)
        self._last_check = self.reactor.seconds()
        self._heartbeat.start(_HEARTBEAT_CHECK, now=False)
        self._update_gauge()

    def _snapshot(self, config: Config, generation: int) -> Path:
        """The validated configuration the workers of a generation read."""
        path = self.run_dir / f"config-{generation}.toml"
        path.write_bytes(Path(config.path).read_bytes())
        path.chmod(0o644)
        return path

    def _spawn(self, index: int, generation: int, snapshot: Path) -> WorkerProcess:
        from .worker import BUMP_FLAG, MASTER_PID_ENV

        worker = WorkerProcess(self, index, generation)
        config = self._pending_config if generation > self.generation else self.config
        if config.user is not None:
            # Workers write their metrics files after dropping privileges.
            from .privileges import resolve

            identity = resolve(config.user, config.group)
            try:
                os.chown(self.metrics_dir, identity.uid, identity.gid)
            except OSError as e:
                self._throttle.emit(log.error, "metrics-dir",
                                    "cannot hand the metrics directory {dir} to the workers'"
                                    " user: {error}", dir=str(self.metrics_dir),
                                    error=e.strerror)  # fmt: skip
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        env[MASTER_PID_ENV] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p
        )
        argv = [
            sys.executable,
            "-m",
            "tproxy_twist.worker",
            "--config",
            str(snapshot),
            "--index",
            str(index),
            "--generation",
            str(generation),
        ]
        if config.bumps:
            argv.append(BUMP_FLAG)  # this worker must be able to start TLS
        if config.user is not None:
            # Said here, not only in the file: twistd's --uid/--gid end up here too.
            argv += ["--user", config.user]
            if config.group is not None:
                argv += ["--group", config.group]
        self.reactor.spawnProcess(
            worker, sys.executable, argv, env=env, childFDs={0: "w", 1: "r", 2: "r", 3: "r"}
        )
        self.reactor.callLater(_START_TIMEOUT, self._check_started, worker)
        log.info(
            "worker {index} started (pid {pid}, generation {g})",
            index=index,
            pid=worker.pid,
            g=generation,
        )
        return worker

    def _check_started(self, worker: WorkerProcess) -> None:
        if worker.state == "starting":
            log.error(
                "worker {index} (pid {pid}) not ready after {t:g}s; killing it",
                index=worker.index,
                pid=worker.pid,
                t=_START_TIMEOUT,
            )
            worker.last_error = worker.last_error or "start-up timed out"
            worker.signal(signal.SIGKILL)

    # --- heartbeats ---------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        now = self.reactor.seconds()
        late = now - self._last_check
        self._last_check = now
        if late > 2.5 * _HEARTBEAT_CHECK:
            # The master itself did not run for a while (stopped, or a starved
            # machine): the workers' lines are still in the pipes, unread.
            for worker in self.current.values():
                worker.last_heard = max(worker.last_heard, now)
            return
        changed = False
        for worker in list(self.current.values()):
            if worker.state != "ready":
                continue
            quiet = now - worker.last_heard
            if quiet >= self.config.heartbeat_grace:
                log.error(
                    "worker {index} (pid {pid}) silent for {quiet:.1f}s: killing it",
                    index=worker.index,
                    pid=worker.pid,
                    quiet=quiet,
                )
                worker.last_error = f"no heartbeat for {quiet:.1f}s"
                worker.signal(signal.SIGKILL)
            elif quiet >= HEARTBEAT_TIMEOUT and not worker.silent:
                worker.silent = True
                changed = True
                log.error(
                    "worker {index} (pid {pid}) silent for {quiet:.1f}s (stopped or stuck):"
                    " not ready; it is killed and replaced if still silent after {grace:g}s",
                    index=worker.index,
                    pid=worker.pid,
                    quiet=quiet,
                    grace=self.config.heartbeat_grace,
                )
        if changed:
            self._update_gauge()

    # --- reports from workers ---------------------------------------------------

    def worker_reported(self, worker: WorkerProcess, line: str) -> None:
        state, _, detail = line.partition(" ")
        if worker.silent:
            worker.silent = False
            log.info("worker {index} (pid {pid}) answers again", index=worker.index,
                     pid=worker.pid)  # fmt: skip
            self._update_gauge()
        if state == "alive":
            if detail.isdigit():
                worker.connections = int(detail)
            return
        if state == "problem":
            self._problem(worker, detail)
            return
        if state == "ready":
            worker.state = "ready"
            worker.was_ready = True
            self._ever_ready = True
            log.info("worker {index} ready (pid {pid})", index=worker.index, pid=worker.pid)
            if self.pending is not None and all(w.state == "ready" for w in self.pending.values()):
                self._switch_generation()
        elif state == "draining":
            worker.state = "draining"
            log.info("worker {index} draining (pid {pid})", index=worker.index, pid=worker.pid)
        elif state == "failed":
            worker.last_error = detail
        self._update_gauge()

    def _problem(self, worker: WorkerProcess, detail: str) -> None:
        from .status.problems import decode

        problem = decode(detail, worker.index)
        if problem is not None and self.on_problem is not None:
            self.on_problem(problem)

    def note_reload(self, result: str, detail: str) -> None:
        """Remember the last reload's outcome: started, ok, refused or failed."""
        self.last_reload = {"time": self.reactor.seconds(), "result": result, "detail": detail}

    def worker_exited(self, worker: WorkerProcess, how: str) -> None:
        # Whatever fails in here, the worker is still replaced.
        try:
            self._forget_metrics(worker)
        finally:
            self._handle_exit(worker, how)

    def _forget_metrics(self, worker: WorkerProcess) -> None:
        if worker.pid is None:
            return
        try:
            retire_metric_files(self.metrics_dir, worker.pid)
        except Exception as e:
            self._throttle.emit(
                log.error,
                "metrics-dir",
                "cannot tidy the metrics files of worker pid {pid} in {dir}: {error}",
                pid=worker.pid,
                dir=str(self.metrics_dir),
                error=str(e),
            )

    def _handle_exit(self, worker: WorkerProcess, how: str) -> None:
        from .metrics import WORKER_RESTARTS

        self.retired.discard(worker)
        if self._stopping is not None:
            log.info("worker {index} (pid {pid}) {how}", index=worker.index, pid=worker.pid,
                     how=how)  # fmt: skip
            if self.current.get(worker.index) is worker:
                del self.current[worker.index]
            if not self.current and not self.retired and not self.pending:
                self._stopping.callback(None)
            return
        if self.pending is not None and self.pending.get(worker.index) is worker:
            log.error(
                "reload failed: new worker {index} {how} before it was ready ({why});"
                " keeping generation {g}",
                index=worker.index,
                how=how,
                why=worker.last_error or "no reason given",
                g=self.generation,
            )
            self.note_reload(
                "failed",
                f"new worker {worker.index} {how} before it was ready"
                f" ({worker.last_error or 'no reason given'}); kept generation {self.generation}",
            )
            self._abandon_pending()
            self._update_gauge()
            self._run_queued_reload()
            return
        if self.current.get(worker.index) is not worker:
            log.info(
                "worker {index} (pid {pid}, generation {g}) {how}",
                index=worker.index,
                pid=worker.pid,
                g=worker.generation,
                how=how,
            )
            self._update_gauge()
            return
        # A worker of the current generation died.
        del self.current[worker.index]
        self._update_gauge()
        if not self._ever_ready and not worker.was_ready:
            self._first_failures[worker.index] = worker.last_error or how
            if len(self._first_failures) >= self.worker_count:
                reasons = sorted(set(self._first_failures.values()))
                if self.on_fatal is not None:
                    for call in self._respawns.values():
                        call.cancel()
                    self._respawns.clear()
                    self.on_fatal(
                        f"every worker of generation {self.generation} failed to start: "
                        + "; ".join(reasons)
                    )
                    return
        WORKER_RESTARTS.inc()
        self.restarts[worker.index] = self.restarts.get(worker.index, 0) + 1
        lived = self.reactor.seconds() - worker.started
        if worker.was_ready and lived >= _STEADY:
            self._failures[worker.index] = 0
            delay = 0.0
        else:
            failures = self._failures.get(worker.index, 0) + 1
            self._failures[worker.index] = failures
            delay = min(_MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
        log.error(
            "worker {index} (pid {pid}) {how} after {lived:.1f}s{why}; restarting it in {delay:g}s",
            index=worker.index,
            pid=worker.pid,
            how=how,
            lived=lived,
            why=f" ({worker.last_error})" if worker.last_error else "",
            delay=delay,
        )
        snapshot = self.run_dir / f"config-{self.generation}.toml"
        self._respawns[worker.index] = self.reactor.callLater(
            delay, self._respawn, worker.index, snapshot
        )

    def _respawn(self, index: int, snapshot: Path) -> None:
        self._respawns.pop(index, None)
        if self._stopping is None and index not in self.current:
            self.current[index] = self._spawn(index, self.generation, snapshot)

    def signal_all(self, number: int) -> None:
        for worker in [*self.current.values(), *self.retired]:
            worker.signal(number)

    # --- reload -----------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """
        Bring up a generation for C{config}; retire the current one once it
        is ready.  While a generation is still starting, only remember
        C{config}: the latest one is brought up when that one is done.
        """
        if self._stopping is not None:
            return
        if self.pending is not None:
            if self._queued_config is None:
                log.info(
                    "reload: generation {g} is still starting; the next reload follows it",
                    g=self.generation + 1,
                )
            self._queued_config = config
            return
        generation = self.generation + 1
        snapshot = self._snapshot(config, generation)
        self._pending_config = config
        count = config.workers or os.cpu_count() or 1
        log.info("reload: starting generation {g} ({n} worker(s))", g=generation, n=count)
        self.pending = {i: self._spawn(i, generation, snapshot) for i in range(1, count + 1)}
        self.note_reload("started", f"generation {generation} starting")
        self._pending_timer = self.reactor.callLater(_START_TIMEOUT, self._pending_timed_out)

    def _run_queued_reload(self) -> None:
        config, self._queued_config = self._queued_config, None
        if config is not None:
            self.reload(config)

    def _pending_timed_out(self) -> None:
        self._pending_timer = None
        log.error(
            "reload failed: the new workers were not ready within {t:g}s; keeping generation {g}",
            t=_START_TIMEOUT,
            g=self.generation,
        )
        self.note_reload(
            "failed",
            f"the new workers were not ready within {_START_TIMEOUT:g}s;"
            f" kept generation {self.generation}",
        )
        self._abandon_pending()
        self._run_queued_reload()

    def _abandon_pending(self) -> None:
        pending, self.pending = self.pending or {}, None
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None
        for worker in pending.values():
            self._retire(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """Drain C{worker}: it may already be accepting; kill it only if it hangs."""
        if worker.state == "exited":
            return
        self.retired.add(worker)
        worker.signal(signal.SIGTERM)
        self.reactor.callLater(self.config.drain_timeout + 5.0, self._kill_if_alive, worker)

    def _switch_generation(self) -> None:
        pending, self.pending = self.pending, None
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None
        old = list(self.current.values())
        self.config = self._pending_config
        self.generation = max(w.generation for w in pending.values())
        self.current = dict(pending)
        self.config_loaded = self.reactor.seconds()
        self.note_reload("ok", f"generation {self.generation} serving")
        self._failures.clear()
        for index, call in list(self._respawns.items()):
            call.cancel()
            del self._respawns[index]
        log.info(
            "generation {g} ready and serving ({n} worker(s)); draining {old} old worker(s)",
            g=self.generation,
            n=len(self.current),
            old=len(old),
        )
        for worker in old:
            self._retire(worker)
        self._update_gauge()
        self._run_queued_reload()

    def _kill_if_alive(self, worker: WorkerProcess) -> None:
        if worker.state != "exited":
            log.warn("worker {index} (pid {pid}) did not exit after draining; killing it",
                     index=worker.index, pid=worker.pid)  # fmt: skip
            worker.signal(signal.SIGKILL)

    # --- stop -------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = defer.Deferred()
        if self._heartbeat.running:
            self._heartbeat.stop()
        for call in self._respawns.values():
            call.cancel()
        self._respawns.clear()
        workers = [*self.current.values(), *self.retired, *(self.pending or {}).values()]
        workers = [w for w in workers if w.state != "exited"]
        if not workers:
            return defer.succeed(None)
        log.info("stopping: draining {n} worker(s)", n=len(workers))
        for worker in workers:
            worker.signal(signal.SIGTERM)
        kill = self.reactor.callLater(
            self.config.drain_timeout + 5.0,
            lambda: [w.signal(signal.SIGKILL) for w in workers if w.state != "exited"],
        )

        def done(result):
            if kill.active():
                kill.cancel()
            return result

        return self._stopping.addBoth(done)


# --- the metrics files of workers that exited ------------------------------------------

_ARCHIVED = ("counter", "histogram")


def retire_metric_files(metrics_dir: Path, pid: int) -> None:
    """
    Forget the live gauges of the exited process C{pid} (prometheus_client's
    C{mark_process_dead}) and fold its counters and histograms into one
    C{<type>_archive.db} per type, so that the totals stay and the number of
    files stays bounded by the number of live processes.  The master's
    scrapes run in the same thread, so none sees a value twice or not at all.
    """
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    multiprocess.mark_process_dead(pid, str(metrics_dir))
    for kind in _ARCHIVED:
        dead = metrics_dir / f"{kind}_{pid}.db"
        if not dead.exists():
            continue
        archive = metrics_dir / f"{kind}_archive.db"
        totals: dict[str, float] = {}
        for source in (archive, dead):
            if source.exists():
                for key, value, *_ in MmapedDict.read_all_values_from_file(str(source)):
                    totals[key] = totals.get(key, 0.0) + value
        fresh = metrics_dir / f".{kind}_archive.db.new"
        fresh.unlink(missing_ok=True)
        merged = MmapedDict(str(fresh))
        try:
            for key, value in totals.items():
                merged.write_value(key, value, 0.0)
        finally:
            merged.close()
        os.replace(fresh, archive)
        dead.unlink()


# --- the metrics listener ------------------------------------------------------------


class _Metrics(Resource):
    """/metrics: every process's metrics, summed (prometheus_client multiprocess)."""

    isLeaf = True

    def __init__(self, metrics_dir: Path) -> None:
        super().__init__()
        from prometheus_client import CollectorRegistry, multiprocess

        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=str(metrics_dir))

    def render_GET(self, request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else None)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self.registry)


class _Health(Resource):
    """/healthz: 200 when every worker of the current generation is ready and answering."""

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request) -> bytes:
        s = self.supervisor
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        text = f"{s.ready_count()}/{s.worker_count} workers ready, generation {s.generation}\n"
        for worker in s.unresponsive():
            quiet = s.reactor.seconds() - worker.last_heard
            text += f"worker {worker.index} (pid {worker.pid}): no heartbeat for {quiet:.0f}s\n"
        if not s.all_ready():
            request.setResponseCode(503)
        return text.encode()


def metrics_site(metrics_dir: Path, supervisor: WorkerSupervisor, board=None) -> Site:
    """
    The master's HTTP site: C{/metrics} and C{/healthz}; with a status
    C{board} (L{tproxy_twist.status.board.StatusBoard}), C{/status} and
    C{/status.json} for the clients in C{[metrics] status_allow}.
    """
    root = Resource()
    root.putChild(b"metrics", _Metrics(metrics_dir))
    root.putChild(b"healthz", _Health(supervisor))
    if board is not None:
        from .status.web import StatusResource

        def allowed() -> tuple:
            return supervisor.config.status_allow

        root.putChild(b"status", StatusResource(board.document, allowed, as_json=False))
        root.putChild(b"status.json", StatusResource(board.document, allowed, as_json=True))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # scrapes are not worth a log line each
    return site


def _endpoint(address: ListenAddress) -> str:
    """A strports description for C{address}."""
    host = address.host.replace(":", "\\:")
    return f"tcp:{address.port}:interface={host}"


class MasterService(MultiService):
    """
    The whole daemon: the metrics listener (a C{strports} service child),
    the worker supervisor, signal handling.

    The metrics listener binds in C{privilegedStartService}, before any
    worker is spawned: if it cannot, the master exits with one line and no
    worker ever ran.
    """

    def __init__(
        self,
        config: Config,
        reactor=None,
        workers_override: int | None = None,
        run_dir: Path | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.workers_override = workers_override
        self.config = config
        self.metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.run_dir = run_dir or self.metrics_dir.parent
        self.exit_status = 0
        self._metrics_service: Service | None = None
        self._metrics_address: ListenAddress | None = None
        self.supervisor = WorkerSupervisor(
            config, self.run_dir, reactor, self.metrics_dir, on_fatal=self.fail
        )
        from .status.board import StatusBoard
        from .tap import version

        self.status = StatusBoard(self, self.metrics_dir, reactor, version())
        self.supervisor.on_problem = self.status.problems.add
        self._set_metrics_listener(config)
        self.supervisor.setServiceParent(self)
        self.status.setServiceParent(self)

    def _set_metrics_listener(self, config: Config) -> None:
        """Make the metrics listener listen on C{config}'s address (replacing any)."""
        old, self._metrics_service = self._metrics_service, None
        if old is not None:
            old.disownServiceParent()
        address = config.metrics_listen
        if address is None:
            return
        service = strports.service(
            _endpoint(address),
            metrics_site(self.metrics_dir, self.supervisor, self.status),
            self.reactor,
        )
        service.setName(f"metrics {address}")
        # StreamServerEndpointService only raises a listen error (instead of
        # logging it) while this is set; it is a documented ivar, underscored.
        service._raiseSynchronously = True
        self._metrics_service = service
        self._metrics_address = address
        if self.running:
            try:
                service.setServiceParent(self)
            except error.CannotListenError as e:
                service.disownServiceParent()
                self._metrics_service = None
                log.error("cannot listen for metrics on {listen}: {error}", listen=str(address),
                          error=_why(e))  # fmt: skip
                return
            log.info("metrics on http://{listen}/metrics", listen=str(address))
        else:
            service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        from . import resources

        try:
            check_bump_kit(self.config, self.reactor)
        except configuration.ConfigError as e:
            raise SystemExit(f"tproxy-twist: {e}") from None
        _enable_request_migration()
        capacity = resources.connection_capacity(self.config.limits.max_connections)
        if capacity.lowered:
            log.warn("{warning}", warning=capacity.warning())
        from .status.board import startup_probes

        self.status.probes = startup_probes(self.config, capacity)
        try:
            super().privilegedStartService()
        except error.CannotListenError as e:
            raise SystemExit(
                f"tproxy-twist: cannot listen for metrics on {self._metrics_address}"
                f" ([metrics] listen in {self.config.path}): {_why(e)}"
            ) from None
        if self._metrics_service is not None:
            log.info("metrics on http://{listen}/metrics", listen=str(self._metrics_address))

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        # logrotate sends SIGUSR1: twistd reopens its own log file (if it
        # installed a handler), the workers reopen their access logs.
        previous = signal.getsignal(signal.SIGUSR1)

        def on_usr1(number, frame):
            self.reactor.callFromThread(self.supervisor.signal_all, signal.SIGUSR1)
            if callable(previous):
                previous(number, frame)

        signal.signal(signal.SIGUSR1, on_usr1)

    def fail(self, reason: str) -> None:
        """A permanent start-up error: say it in one line, stop, exit non-zero."""
        log.critical("tproxy-twist cannot start: {reason}", reason=reason)
        self.exit_status = EXIT_START_FAILED
        _exit_with_status_at_exit(EXIT_START_FAILED)
        if self.reactor.running:
            self.reactor.stop()

    def reload(self) -> None:
        path = self.config.path
        try:
            config = configuration.load(path)
            if self.workers_override is not None:
                config = configuration.with_workers(config, self.workers_override)
            check_bump_kit(config, self.reactor)
        except configuration.ConfigError as e:
            log.error("reload refused, still running the previous configuration: {error}",
                      error=str(e))  # fmt: skip
            self.supervisor.note_reload("refused", str(e))
            return
        log.info("reloading {path}", path=path)
        if config.metrics_listen != self.config.metrics_listen:
            self._set_metrics_listener(config)
        self.config = config
        self.supervisor.reload(config)

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def check_bump_kit(config: Config, clock) -> None:
    """
    When a TLS port of C{config} may bump, load what its workers will load
    (the CA and its key, the trust bundle) and throw it away: a bad key is
    a start-up error, or a refused reload, with one line naming the file and
    key, not a loop of workers failing to start.  Raises L{ConfigError}.
    """
    if not config.bumps:
        return
    from .tls.bumpkit import load_bump_kit

    load_bump_kit(config, clock, metrics=False)


def _why(e: error.CannotListenError) -> str:
    reason = e.socketError
    return getattr(reason, "strerror", None) or str(reason)


def _exit_with_status_at_exit(status: int) -> None:
    """
    twistd always exits 0 after a clean reactor stop and has no way to say
    otherwise: end the process with C{status} once the interpreter exits
    (after twistd removed its pid file and the reactor shut down).
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(leave)


# --- the runtime directory ---------------------------------------------------------------

_RUNTIME_PREFIX = "tproxy-twist-"
_RUNTIME_NAME = re.compile(r"^tproxy-twist-(\d+)\.(\d+)$")


def _start_time(pid: int) -> str | None:
    """The start time of C{pid} (field 22 of /proc/PID/stat), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _runtime_base() -> Path:
    """systemd's C{RuntimeDirectory} when the unit has one, else the temporary directory."""
    return Path(os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.gettempdir())


def remove_stale_runtime_dirs(base: Path) -> list[Path]:
    """
    Remove the runtime directories of masters that are gone (crashed: a
    master that stops removes its own); return them.  A directory is named
    after its master's pid and start time, so a reused pid does not save it
    and a master that is running keeps its own.
    """
    removed = []
    for path in base.glob(f"{_RUNTIME_PREFIX}*"):
        match = _RUNTIME_NAME.match(path.name)
        if match is None or not path.is_dir():
            continue
        pid, start = match.groups()
        if _start_time(int(pid)) == start:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def prepare_runtime_dir() -> Path:
    """
    This master's runtime directory (config snapshots, and C{metrics/} for
    prometheus_client's multiprocess files), after removing those of crashed
    masters.  C{PROMETHEUS_MULTIPROC_DIR} is set in the environment: call
    this before prometheus_client is imported anywhere in this process.
    """
    base = _runtime_base()
    for stale in remove_stale_runtime_dirs(base):
        log.info("removed {path}, left by a master that is gone", path=str(stale))
    path = base / f"{_RUNTIME_PREFIX}{os.getpid()}.{_start_time(os.getpid())}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    metrics = path / "metrics"
    metrics.mkdir(mode=0o755)
    metrics.chmod(0o755)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    return path


def _enable_request_migration() -> None:
    """
    net.ipv4.tcp_migrate_req=1: connections waiting in a closing reuseport
    listener's queue move to another listener instead of being reset.
    """
    knob = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    try:
        if knob.read_text().strip() != "1":
            knob.write_text("1\n")
            log.info("enabled net.ipv4.tcp_migrate_req for hitless reloads")
    except OSError as e:
        log.warn(
            "cannot enable net.ipv4.tcp_migrate_req ({error}): a reload may reset"
            " connections still queued on an old worker's listener",
            error=e.strerror,
        )
