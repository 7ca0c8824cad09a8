"""
The master: spawns and supervises the workers, reloads and stops them
without losing requests, and serves the metrics of all of them.

It never listens on a proxy port itself: a socket in a SO_REUSEPORT group
that nobody accepts on would still get its share of connections.

Workers are fresh interpreters (C{python -m tproxy_twist.worker}), never
forks of this process: a fork would share the reactor's epoll descriptor.
Each worker reports its state on a pipe (fd 3: "ready", "draining",
"failed <reason>") and its log events as JSON lines on stdout, which the
master re-emits into its own log with the worker's index as the system.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import config as configuration
from .config import Config

log = Logger()

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_START_TIMEOUT = 30.0  # a new generation must be ready within this
_STEADY = 5.0  # a worker that ran this long before dying is respawned at once
_MAX_BACKOFF = 30.0


class WorkerProcess(ProcessProtocol):
    """One worker as the master sees it."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, generation: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.generation = generation
        self.state = "starting"  # -> ready -> draining; "exited" at the end
        self.was_ready = False
        self.pid: int | None = None
        self.started = supervisor.reactor.seconds()
        self.last_error = ""
        self._buffers = {1: b"", 2: b"", 3: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
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


class WorkerSupervisor(Service):
    """Keeps C{config.workers} workers of the current generation running."""

    def __init__(self, config: Config, run_dir: Path, reactor, metrics_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.metrics_dir = metrics_dir
        self.reactor = reactor
        self.generation = 0
        self.current: dict[int, WorkerProcess] = {}
        self.retired: set[WorkerProcess] = set()  # draining or replaced
        self.pending: dict[int, WorkerProcess] | None = None  # a generation coming up
        self._pending_config: Config | None = None
        self._pending_timer = None
        self._failures: dict[int, int] = {}
        self._respawns: dict[int, object] = {}
        self._stopping: defer.Deferred | None = None

    # --- counts --------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        return self.config.workers or os.cpu_count() or 1

    def all_ready(self) -> bool:
        return len(self.current) == self.worker_count and all(
            w.state == "ready" for w in self.current.values()
        )

    def ready_count(self) -> int:
        return sum(w.state == "ready" for w in self.current.values())

    def _update_gauge(self) -> None:
        from .metrics import WORKERS

        WORKERS.set(self.ready_count())

    # --- start ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.generation = 1
        snapshot = self._snapshot(self.config, self.generation)
        log.info("starting {n} worker(s), generation {g}", n=self.worker_count, g=self.generation)
        for index in range(1, self.worker_count + 1):
            self.current[index] = self._spawn(index, self.generation, snapshot)

    def _snapshot(self, config: Config, generation: int) -> Path:
        """The validated configuration the workers of a generation read."""
        path = self.run_dir / f"config-{generation}.toml"
        path.write_bytes(Path(config.path).read_bytes())
        path.chmod(0o644)
        return path

    def _spawn(self, index: int, generation: int, snapshot: Path) -> WorkerProcess:
        worker = WorkerProcess(self, index, generation)
        config = self._pending_config if generation > self.generation else self.config
        if config.user is not None:
            # Workers write their metrics files after dropping privileges.
            from .privileges import resolve

            identity = resolve(config.user, config.group)
            os.chown(self.metrics_dir, identity.uid, identity.gid)
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
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

    # --- reports from workers ---------------------------------------------------

    def worker_reported(self, worker: WorkerProcess, line: str) -> None:
        state, _, detail = line.partition(" ")
        if state == "ready":
            worker.state = "ready"
            worker.was_ready = True
            log.info("worker {index} ready (pid {pid})", index=worker.index, pid=worker.pid)
            if self.pending is not None and all(w.state == "ready" for w in self.pending.values()):
                self._switch_generation()
        elif state == "draining":
            worker.state = "draining"
            log.info("worker {index} draining (pid {pid})", index=worker.index, pid=worker.pid)
        elif state == "failed":
            worker.last_error = detail
        self._update_gauge()

    def worker_exited(self, worker: WorkerProcess, how: str) -> None:
        from prometheus_client import multiprocess

        from .metrics import WORKER_RESTARTS

        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid, str(self.metrics_dir))
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
                " keeping the running generation",
                index=worker.index,
                how=how,
                why=worker.last_error or "no reason given",
            )
            self._abandon_pending()
            self._update_gauge()
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
        # A worker of the current generation died: replace it.
        WORKER_RESTARTS.inc()
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
        del self.current[worker.index]
        self._update_gauge()
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
        """Bring up a generation for C{config}; retire the current one once it is ready."""
        if self._stopping is not None:
            return
        if self.pending is not None:
            log.warn("reload already in progress; this one replaces it")
            self._abandon_pending()
        generation = self.generation + 1
        snapshot = self._snapshot(config, generation)
        self._pending_config = config
        count = config.workers or os.cpu_count() or 1
        log.info("reload: starting generation {g} ({n} worker(s))", g=generation, n=count)
        self.pending = {i: self._spawn(i, generation, snapshot) for i in range(1, count + 1)}
        self._pending_timer = self.reactor.callLater(_START_TIMEOUT, self._pending_timed_out)

    def _pending_timed_out(self) -> None:
        self._pending_timer = None
        log.error(
            "reload failed: the new workers were not ready within {t:g}s;"
            " keeping the running generation",
            t=_START_TIMEOUT,
        )
        self._abandon_pending()

    def _abandon_pending(self) -> None:
        pending, self.pending = self.pending or {}, None
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None
        for worker in pending.values():
            if worker.state != "exited":
                self.retired.add(worker)
                worker.signal(signal.SIGKILL)

    def _switch_generation(self) -> None:
        pending, self.pending = self.pending, None
        if self._pending_timer is not None and self._pending_timer.active():
            self._pending_timer.cancel()
        self._pending_timer = None
        old = list(self.current.values())
        self.config = self._pending_config
        self.generation = max(w.generation for w in pending.values())
        self.current = dict(pending)
        self._failures.clear()
        for index, call in list(self._respawns.items()):
            call.cancel()
            del self._respawns[index]
        log.info("generation {g} ready; draining {n} old worker(s)", g=self.generation, n=len(old))
        for worker in old:
            if worker.state != "exited":
                self.retired.add(worker)
                worker.signal(signal.SIGTERM)
                self.reactor.callLater(self.config.drain_timeout + 5.0, self._kill_if_alive, worker)
        self._update_gauge()

    def _kill_if_alive(self, worker: WorkerProcess) -> None:
        if worker.state != "exited":
            log.warn("worker {index} (pid {pid}) did not exit after draining; killing it",
                     index=worker.index, pid=worker.pid)  # fmt: skip
            worker.signal(signal.SIGKILL)

    # --- stop -------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = defer.Deferred()
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
    """/healthz: 200 when every worker of the current generation is ready."""

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request) -> bytes:
        s = self.supervisor
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        text = f"{s.ready_count()}/{s.worker_count} workers ready, generation {s.generation}\n"
        if not s.all_ready():
            request.setResponseCode(503)
        return text.encode()


class MasterService(MultiService):
    """The whole daemon: supervisor, metrics listener, signal handling."""

    def __init__(self, config: Config, reactor=None, workers_override: int | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.workers_override = workers_override
        self.config = config
        self.run_dir = Path(tempfile.mkdtemp(prefix="tproxy-twist-"))
        self.run_dir.chmod(0o755)
        self.metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.supervisor = WorkerSupervisor(config, self.run_dir, reactor, self.metrics_dir)
        self.supervisor.setServiceParent(self)
        self._metrics_port = None

    def privilegedStartService(self) -> None:
        _enable_request_migration()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self._listen_metrics(self.config)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        # logrotate sends SIGUSR1: twistd reopens its own log file (if it
        # installed a handler), the workers reopen their access logs.
        previous = signal.getsignal(signal.SIGUSR1)

        def on_usr1(number, frame):
            self.reactor.callFromThread(self.supervisor.signal_all, signal.SIGUSR1)
            if callable(previous):
                previous(number, frame)

        signal.signal(signal.SIGUSR1, on_usr1)

    def _listen_metrics(self, config: Config) -> None:
        address = config.metrics_listen
        if address is None:
            return
        root = Resource()
        root.putChild(b"metrics", _Metrics(self.metrics_dir))
        root.putChild(b"healthz", _Health(self.supervisor))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # scrapes are not worth a log line each
        self._metrics_port = self.reactor.listenTCP(address.port, site, interface=address.host)
        log.info("metrics on http://{listen}/metrics", listen=str(address))

    def reload(self) -> None:
        path = self.config.path
        try:
            config = configuration.load(path)
            if self.workers_override is not None:
                config = configuration.with_workers(config, self.workers_override)
        except configuration.ConfigError as e:
            log.error("reload refused, still running the previous configuration: {error}",
                      error=str(e))  # fmt: skip
            return
        log.info("reloading {path}", path=path)
        if config.metrics_listen != self.config.metrics_listen:
            port, self._metrics_port = self._metrics_port, None
            d = defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)
            d.addCallback(lambda _: self._listen_metrics(config))
        self.config = config
        self.supervisor.reload(config)

    @defer.inlineCallbacks
    def stopService(self):
        if self._metrics_port is not None:
            yield self._metrics_port.stopListening()
        yield super().stopService()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def prepare_metrics_dir() -> Path:
    """
    A fresh directory for prometheus_client's multiprocess files, set in the
    environment before prometheus_client is imported anywhere in this process.
    """
    path = Path(tempfile.mkdtemp(prefix="tproxy-twist-metrics-"))
    path.chmod(0o755)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
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
