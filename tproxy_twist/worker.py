"""
A worker: the process that serves traffic.  It opens its own listener per
configured port (SO_REUSEPORT: the kernel spreads connections over the
workers), drops privileges, tells the master it is ready, and relays until
told to drain.

Run by the master as C{python -m tproxy_twist.worker --config FILE --index N}
with C{PROMETHEUS_MULTIPROC_DIR} and C{TPROXY_TWIST_MASTER_PID} set in its
environment; not by hand.

The worker never outlives its master: the kernel sends it SIGTERM when the
master dies (PR_SET_PDEATHSIG, set before anything else), and the master's
end of the worker's stdin closing means the same.  While its reactor runs it
writes a heartbeat line to the master every L{HEARTBEAT_INTERVAL} seconds
from the reactor thread, so a stopped, looping or deadlocked worker falls
silent and the master notices.
"""

from __future__ import annotations

import os
import sys

#: The master's pid, in the environment of every worker it spawns.
MASTER_PID_ENV = "TPROXY_TWIST_MASTER_PID"
#: The argument the master adds when a TLS port may bump: this worker needs TLS.
BUMP_FLAG = "--bump"


def _die_with_master() -> None:
    """
    Ask for SIGTERM when the master dies, then check it has not died
    already (before the request, when nothing would be sent).  Cheap on
    purpose: it runs before the heavy imports.
    """
    import ctypes
    import signal

    expected = os.environ.get(MASTER_PID_ENV)
    if expected is None:
        return  # not started by a master (a test, or by hand)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != expected:
        sys.stderr.write("the master is gone; not starting\n")
        os._exit(3)


if __name__ == "__main__":
    _die_with_master()
    # twisted.internet.tcp imports pyOpenSSL and cryptography for startTLS
    # when they can be imported: about 6 MB of memory in every worker.  Only
    # a worker that bumps (the master passes --bump when a TLS port may)
    # speaks TLS itself; without them the others' TCP simply has no TLS.
    if BUMP_FLAG not in sys.argv[1:]:
        sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]

import argparse  # noqa: E402
import errno  # noqa: E402
import gc  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
from collections.abc import Callable  # noqa: E402

from twisted.application.service import Service  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.interfaces import IReadDescriptor  # noqa: E402
from twisted.logger import Logger  # noqa: E402
from zope.interface import implementer  # noqa: E402

from .config import Config, PortConfig  # noqa: E402
from .logthrottle import LogThrottle  # noqa: E402
from .resolver import DestinationResolver  # noqa: E402
from .sockets import (  # noqa: E402
    ACCEPT_PAUSE,
    LocalAddresses,
    connect_upstream,
    listening_socket,
    serve_accepts,
)

log = Logger()

#: Status lines a worker writes to the master on this file descriptor.
STATUS_FD = 3
#: Seconds between two heartbeat lines ("alive") on the status pipe.
HEARTBEAT_INTERVAL = 1.0


class StartupError(Exception):
    """The proxy cannot start; the message tells the operator what to do."""


def check_tproxy_support(config: Config) -> None:
    """
    Squid's start-up probe: a tproxy port is useless if a transparent socket
    cannot bind a foreign address, so refuse to start rather than answer
    every request with 502.
    """
    from .preflight import startup_problems

    problems = startup_problems(config)
    if problems:
        raise StartupError("\n".join(problems))


class ProxyService(Service):
    """
    Listens on every configured port and relays what arrives.

    L{privilegedStartService} binds the listening sockets (before privileges
    are dropped, so that a port in use is a start-up error with a message);
    L{startService} starts accepting on them; L{stopService} drains: it stops
    accepting, lets in-flight requests finish for up to C{drain_timeout}
    seconds, and returns a L{Deferred} that fires when that is done.
    """

    def __init__(
        self,
        config: Config,
        reactor=None,
        access_log=None,
        *,
        max_connections: int | None = None,
        bump=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.config = config
        self.access_log = access_log
        #: The connections this worker takes at most (C{limits.max_connections},
        #: or fewer when the open-file limit is lower: see L{resources}).
        self.max_connections = max_connections or config.limits.max_connections
        #: The L{tproxy_twist.tls.bumpkit.BumpKit} when a TLS port may bump
        #: (loaded as root, before privileges are dropped).
        self.bump = bump
        self._sockets: list[tuple[PortConfig, socket.socket]] = []
        self._ports = []
        self.factories = []
        self.budget = None
        self._bcrypt_pool = None  # password checks (auth.BcryptPool), when a port has auth
        #: The recent upstream errors and rejections, not yet told to the master.
        self.problems = None
        #: The worker's own repeating lines (a listener out of descriptors).
        self._throttle = LogThrottle(reactor)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for port in self.config.ports:
            try:
                sock = listening_socket(port.listen, transparent=port.mode == "tproxy")
            except OSError as e:
                self._close_sockets()
                raise StartupError(
                    f"cannot listen on {port.listen} (port {port.name!r}): {e.strerror}"
                ) from None
            self._sockets.append((port, sock))

    def _close_sockets(self) -> None:
        for _, sock in self._sockets:
            sock.close()
        self._sockets = []

    def startService(self) -> None:
        from .http.relay import ConnectionBudget, RelaySettings

        super().startService()
        reactor = self._reactor
        settings = RelaySettings(
            timeouts=self.config.timeouts,
            limits=self.config.limits,
            pseudonym=self.config.visible_hostname or socket.gethostname(),
        )
        shared = {
            "settings": settings,
            "connect": connect_upstream(reactor),
            "clock": reactor,
            "local_addresses": LocalAddresses(reactor),
            "access_log": self.access_log,
        }
        self.budget = ConnectionBudget(
            self.max_connections, self._pause_accepting, self._resume_accepting
        )
        if any(port.auth is not None for port, _ in self._sockets):
            from .auth import BcryptPool

            self._bcrypt_pool = BcryptPool(reactor)
            self._bcrypt_pool.start()
        if self.config.metrics_listen is not None:
            from .status.problems import ProblemLog

            self.problems = ProblemLog()
        for port, sock in self._sockets:
            factory = self._factory(port, shared)
            if self.problems is not None:
                from .status.problems import watch_factory

                # The status page's recent problems (their cost: tproxy_twist.status.problems).
                watch_factory(factory, port.name, reactor, self.problems.add)
            self.factories.append(factory)
            listening = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
            _accept_within_budget(
                listening,
                self.budget,
                reactor,
                self._throttle,
                port.name,
                factory.metrics,
                self.problems,
            )
            self._ports.append(listening)
            log.info(
                "{mode} port {name!r} listening on {listen}",
                mode=port.mode,
                name=port.name,
                listen=str(port.listen),
            )
        self._close_sockets()  # the reactor holds its own duplicates

    def _factory(self, port: PortConfig, shared: dict):
        """The protocol factory that serves one configured port."""
        if port.protocol == "tls":
            from .tls.layer import tls_factory

            return tls_factory(
                port,
                self.config,
                self._reactor,
                shared["connect"],
                shared["local_addresses"],
                self.access_log,
                self.budget,
                bump=self.bump,
            )
        from .http.relay import ProxyFactory
        from .metrics import NullPortMetrics, NullStreamMetrics, PortMetrics, StreamMetrics

        # Nobody can read metrics without a listener: don't pay for them.
        metrics_on = self.config.metrics_listen is not None
        metrics = PortMetrics if metrics_on else NullPortMetrics
        streams = StreamMetrics if metrics_on else NullStreamMetrics
        # Resolve -> check -> connect (forward ports, and ports with destination rules).
        resolver = DestinationResolver(
            self._reactor.nameResolver,
            port.destinations,
            own=shared["local_addresses"],
            builtin=port.mode == "forward",
            clock=self._reactor,
            timeout=self.config.timeouts.connect,  # resolving a name is part of connecting
        )
        authenticator = None
        if port.auth is not None:
            from .auth import Authenticator

            authenticator = Authenticator(port.auth, clock=self._reactor, pool=self._bcrypt_pool)
        return ProxyFactory(
            port,
            metrics=metrics(port.name, port.mode),
            stream_metrics=streams(port.name),
            reactor=self._reactor,
            budget=self.budget,
            resolver=resolver,
            authenticator=authenticator,
            **shared,
        )

    # tcp.Port is a FileDescriptor: stopReading/startReading pause accept().
    def _pause_accepting(self) -> None:
        for port in self._ports:
            port.stopReading()

    def _resume_accepting(self) -> None:
        for port in self._ports:
            if port.connected:
                port.startReading()

    def connection_count(self) -> int:
        """Client connections this worker has open."""
        return self.budget.used if self.budget is not None else 0

    def stop_listening(self) -> defer.Deferred:
        ports, self._ports = self._ports, []
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])

    @defer.inlineCallbacks
    def drain(self, timeout: float):
        """
        Stop accepting, let in-flight requests finish (idle keep-alive
        connections are closed), and abort what is left after C{timeout}.
        """
        yield self.stop_listening()
        deadline = self._reactor.seconds() + timeout
        while sum(f.drain() for f in self.factories):
            if self._reactor.seconds() >= deadline:
                left = sum(len(f.connections) for f in self.factories)
                log.warn("drain timeout: aborting {n} connection(s)", n=left)
                for factory in self.factories:
                    factory.abort_all()
                break
            yield task.deferLater(self._reactor, 0.2, lambda: None)
        for factory in self.factories:
            factory.shutdown()

    def stopService(self) -> defer.Deferred:
        """Drain (see L{drain}) for up to C{drain_timeout} seconds."""
        super().stopService()
        self._close_sockets()  # bound but never started: nothing to drain
        return self.drain(self.config.drain_timeout)


def _accept_within_budget(
    port, budget, clock, throttle: LogThrottle, name: str, metrics, problems=None
) -> None:
    """
    Accept on C{port} (L{serve_accepts}), never more connections than
    C{budget} has room for: Twisted accepts up to C{numberAccepts} in one go
    and does not look at whether reading was paused in between, so a full
    budget could be overshot by a whole batch.  Out of descriptors (or
    memory), the port pauses for a moment, counted in C{metrics}; one log
    line per 10 s says so, and goes to the status page's C{problems} too.
    """

    def room() -> int:
        return max(0, budget.limit - budget.used)

    def may_resume() -> bool:
        return port.connected and budget.used < budget.limit

    def on_shortage(error: OSError) -> None:
        reason = errno.errorcode.get(error.errno or 0) or "error"
        metrics.accept_paused(reason)
        hint = ""
        if error.errno == errno.EMFILE:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            hint = (
                f"; this worker's open-files limit (RLIMIT_NOFILE) is {limit}: raise it"
                " (LimitNOFILE= in the systemd unit) or lower limits.max_connections"
            )
        logged = throttle.emit(
            log.warn,
            "accept-" + reason,
            "port {name!r}: cannot accept connections ({error}); they wait in the"
            " kernel's queue, accepting again in {pause:g} s{hint}",
            name=name,
            error=os.strerror(error.errno) if error.errno else str(error),
            pause=ACCEPT_PAUSE,
            hint=hint,
        )
        if logged and problems is not None:
            from .status.problems import ACCEPT_PAUSED, Problem

            problem = Problem(time=clock.seconds(), port=name, kind=ACCEPT_PAUSED, reason=reason)
            problems.add(problem)

    serve_accepts(port, clock, room=room, may_resume=may_resume, on_shortage=on_shortage)


@implementer(IReadDescriptor)
class _PipeEnd:
    """Reads a pipe and discards what comes; calls C{on_eof} once when it closes."""

    def __init__(self, fd: int, on_eof: Callable[[], None]) -> None:
        self._fd = fd
        self._on_eof = on_eof

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "master-pipe"

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet import main

            return main.CONNECTION_DONE  # the reactor removes us and calls connectionLost
        return None

    def connectionLost(self, reason) -> None:
        on_eof, self._on_eof = self._on_eof, None
        if on_eof is not None:
            on_eof()


class MasterLink(Service):
    """
    The worker's side of its pipes to the master.

    Out: status lines (C{ready}, C{draining}, C{failed <reason>}) and a
    heartbeat (C{alive <open connections>}) every C{interval} seconds,
    written from the reactor thread, on the pipe C{status_fd}; before each
    heartbeat, one C{problem <JSON>} line per upstream error or rejection
    since the last (at most L{tproxy_twist.status.problems.RECENT}: older
    ones are dropped).  It is non-blocking: a master that does
    not read (stopped) must not stop the worker; a line that does not fit is
    dropped.  In: the master holds the write end of the worker's stdin and
    never writes to it; when it closes, the master is gone and
    C{on_master_gone} is called.
    """

    def __init__(
        self,
        status_fd: int | None,
        reactor,
        on_master_gone: Callable[[], None],
        *,
        master_fd: int | None = None,
        interval: float = HEARTBEAT_INTERVAL,
        connections: Callable[[], int] | None = None,
        problems=None,
    ) -> None:
        self._status_fd = status_fd
        if status_fd is not None:
            os.set_blocking(status_fd, False)
        self._reactor = reactor
        self._on_master_gone = on_master_gone
        self._master_fd = master_fd
        self._connections = connections
        self._problems = problems  # a tproxy_twist.status.problems.ProblemLog, or None
        self._heartbeat = task.LoopingCall(self.beat)
        self._heartbeat.clock = reactor
        self._interval = interval
        self._pipe: _PipeEnd | None = None

    def set_sources(self, connections: Callable[[], int] | None, problems) -> None:
        """Where the heartbeat reads the open connections and the recent problems."""
        self._connections = connections
        self._problems = problems

    def report(self, state: str) -> None:
        if self._status_fd is None:
            return
        try:
            os.write(self._status_fd, f"{state}\n".encode())  # a short line: all or nothing
        except BlockingIOError:
            pass  # the master is not reading (stopped?): it judges us when it runs again
        except OSError:  # EPIPE: the master is gone
            self._status_fd = None
            self._reactor.callLater(0, self._on_master_gone)

    def beat(self) -> None:
        """Tell the recent problems, then C{alive} with the open connections."""
        if self._problems is not None:
            from .status.problems import encode

            for problem in self._problems.take():
                self.report(encode(problem))
        if self._connections is None:
            self.report("alive")
        else:
            self.report(f"alive {self._connections()}")

    def startService(self) -> None:
        super().startService()
        self._heartbeat.start(self._interval, now=True)
        if self._master_fd is not None:
            os.set_blocking(self._master_fd, False)
            self._pipe = _PipeEnd(self._master_fd, self._on_master_gone)
            self._reactor.addReader(self._pipe)

    def stopService(self) -> None:
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._pipe is not None:
            self._reactor.removeReader(self._pipe)
            self._pipe = None


def settle_heap() -> None:
    """
    Collect the garbage start-up left, then move every object alive now
    (modules, classes, functions, configuration: about 36,000 in a worker)
    into the collector's permanent generation (C{gc.freeze}).

    Why: a full (generation 2) collection walks every tracked object.  Over a
    worker's start-up objects one takes about 19 ms of CPU
    (C{bench/README.md}, "Added latency"), stalling every request in flight;
    new connections leave cyclic garbage, so under a new-connection load
    such a collection comes every few thousand connections.  Frozen objects
    are never walked again; what connections allocate later is collected as
    before.
    """
    gc.collect()
    gc.freeze()


def start_serving(service: ProxyService, link: MasterLink, settle=settle_heap) -> None:
    """
    Start accepting (L{ProxyService.startService}) and the heartbeat, settle
    the heap (L{settle_heap}: everything is imported and built by now), then
    tell the master C{ready}.
    """
    service.startService()
    link.set_sources(service.connection_count, service.problems)
    link.startService()
    settle()
    link.report("ready")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tproxy_twist.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--user", help="run as this user (overrides the config's `user`)")
    parser.add_argument("--group", help="... and group")
    parser.add_argument(
        BUMP_FLAG, action="store_true", help="a TLS port may bump: do not block OpenSSL"
    )
    return parser.parse_args(argv)


def log_observer(stream):
    """
    What a worker's log events go through on their way to the master: JSON
    lines on C{stream}, events below C{info} left out.  Debug events are
    per connection (a spliced stream's end, for one): written, each would
    cost the worker a JSON encoding and a pipe write and the master a decode
    and a formatted line, a log flood under load.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        jsonFileLogObserver,
    )

    return FilteringLogObserver(
        jsonFileLogObserver(stream),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    from .reactor import install

    install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from . import config as configuration
    from . import privileges, resources

    # JSON log events on stdout: the master re-emits them into its own log.
    sys.stdout.reconfigure(line_buffering=True)
    globalLogBeginner.beginLoggingTo([log_observer(sys.stdout)], redirectStandardIO=False)
    status_fd = STATUS_FD if _is_open(STATUS_FD) else None
    stopping: list[defer.Deferred] = []

    def stop() -> defer.Deferred:
        """Drain, close the access log, stop the reactor; once."""
        if stopping:
            return stopping[0]
        link.report("draining")
        log.info("draining (up to {t}s)", t=service.config.drain_timeout)
        d = defer.maybeDeferred(service.stopService)
        if service.access_log is not None:
            d.addBoth(lambda _: service.access_log.close())
        d.addErrback(lambda f: log.failure("draining failed", f))
        d.addBoth(lambda _: reactor.stop())
        stopping.append(d)
        return d

    def master_gone() -> None:
        log.warn("the master is gone: draining and exiting")
        stop()

    master_fd = 0 if os.environ.get(MASTER_PID_ENV) else None
    link = MasterLink(status_fd, reactor, master_gone, master_fd=master_fd)

    # Everything the relay needs is imported now: after the switch to an
    # unprivileged user, the interpreter's own directories may be unreadable.
    from .http import relay  # noqa: F401
    from .metrics import PortMetrics  # noqa: F401
    from .tls import layer  # noqa: F401

    try:
        config = configuration.load(args.config)
        if args.user is not None:
            config = configuration.with_identity(config, args.user, args.group)
        capacity = resources.connection_capacity(config.limits.max_connections)
        bump = None
        if config.bumps:
            if not args.bump:
                raise StartupError(
                    f"a TLS port in {config.path} may bump, but the worker was started"
                    f" without {BUMP_FLAG} (its TCP cannot start TLS)"
                )
            from .tls.bumpkit import load_bump_kit

            # As root: the CA key file is readable by root only.
            bump = load_bump_kit(config, reactor)
        service = ProxyService(config, reactor, max_connections=capacity.effective, bump=bump)
        service.privilegedStartService()
        service.access_log = _open_access_log(config, reactor)  # as root: like nginx
        if config.user is not None:
            identity = privileges.resolve(config.user, config.group)
            if config.access_log.path is not None:
                # Reopening after logrotate happens as the unprivileged user.
                os.chown(config.access_log.path, identity.uid, identity.gid)
            kept = privileges.drop_to(identity)
            log.info(
                "running as {user}:{group}, keeping capability {cap}",
                user=identity.user,
                group=identity.group,
                cap="CAP_NET_RAW" if kept == privileges.CAP_NET_RAW else "CAP_NET_ADMIN",
            )
    except (configuration.ConfigError, StartupError, OSError, KeyError) as e:
        log.critical("worker {index} cannot start: {error}", index=args.index, error=str(e))
        link.report(f"failed {e}")
        return 3

    # Reload is the master's business: a SIGHUP sent to the whole process
    # group (a closing terminal, `timeout`) must not kill the workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    access_log = service.access_log
    if access_log is not None:
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(access_log.reopen))
    else:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(stop))
    signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(stop))

    def start():
        try:
            start_serving(service, link)
        except Exception:
            # Listening sockets nobody accepts on would swallow connections.
            log.failure("worker {index} failed to start", index=args.index)
            link.report("failed start-up error")
            os._exit(3)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return 0


def _open_access_log(config: Config, reactor):
    if config.access_log.path is None:
        return None
    from .accesslog import open_access_log

    return open_access_log(config.access_log, reactor)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
