"""
A worker: the process that serves traffic.  It opens its own listener per
configured port (SO_REUSEPORT: the kernel spreads connections over the
workers), drops privileges, tells the master it is ready, and relays until
told to drain.

Run by the master as C{python -m tproxy_twist.worker --config FILE --index N}
with C{PROMETHEUS_MULTIPROC_DIR} set in its environment; not by hand.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

if __name__ == "__main__":
    # A worker never speaks TLS, yet twisted.internet.tcp imports pyOpenSSL
    # and cryptography for startTLS when they can be imported: about 6 MB of
    # memory in every worker.  Without them Twisted's TCP simply has no TLS.
    sys.modules.setdefault("OpenSSL", None)  # type: ignore[arg-type]

from twisted.application.service import Service  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from .config import Config, PortConfig  # noqa: E402
from .sockets import LocalAddresses, connect_upstream, listening_socket  # noqa: E402

log = Logger()

#: Status lines a worker writes to the master on this file descriptor.
STATUS_FD = 3


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
    """Listens on every configured port and relays what arrives."""

    def __init__(self, config: Config, reactor=None, access_log=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.config = config
        self.access_log = access_log
        # Bind now, before privileges are dropped, so that a port in use is a
        # start-up error with a message, not a log line.
        self._sockets: list[tuple[PortConfig, socket.socket]] = []
        for port in config.ports:
            try:
                sock = listening_socket(port.listen, transparent=port.mode == "tproxy")
            except OSError as e:
                self._close_sockets()
                raise StartupError(
                    f"cannot listen on {port.listen} (port {port.name!r}): {e.strerror}"
                ) from None
            self._sockets.append((port, sock))
        self._ports = []
        self.factories = []

    def _close_sockets(self) -> None:
        for _, sock in self._sockets:
            sock.close()
        self._sockets = []

    def startService(self) -> None:
        from .http.relay import ConnectionBudget, ProxyFactory, RelaySettings
        from .metrics import NullPortMetrics, PortMetrics

        # Nobody can read metrics without a listener: don't pay for them.
        metrics_class = PortMetrics if self.config.metrics_listen is not None else NullPortMetrics

        super().startService()
        reactor = self._reactor
        settings = RelaySettings(
            timeouts=self.config.timeouts,
            limits=self.config.limits,
            pseudonym=socket.gethostname(),
        )
        local = LocalAddresses(reactor)
        connect = connect_upstream(reactor)
        budget = ConnectionBudget(
            self.config.limits.max_connections, self._pause_accepting, self._resume_accepting
        )
        for port, sock in self._sockets:
            if port.protocol == "tls":
                from .tls.layer import tls_factory

                factory = tls_factory(port, self.config, reactor, connect, local, self.access_log,
                                      budget)  # fmt: skip
            else:
                factory = ProxyFactory(
                    port,
                    settings=settings,
                    connect=connect,
                    clock=reactor,
                    local_addresses=local,
                    metrics=metrics_class(port.name, port.mode),
                    access_log=self.access_log,
                    budget=budget,
                )
            self.factories.append(factory)
            self._ports.append(reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
            log.info(
                "{mode} port {name!r} listening on {listen}",
                mode=port.mode,
                name=port.name,
                listen=str(port.listen),
            )
        self._close_sockets()  # the reactor holds its own duplicates

    # tcp.Port is a FileDescriptor: stopReading/startReading pause accept().
    def _pause_accepting(self) -> None:
        for port in self._ports:
            port.stopReading()

    def _resume_accepting(self) -> None:
        for port in self._ports:
            if port.connected:
                port.startReading()

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

    def stopService(self):
        super().stopService()
        return self.stop_listening()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tproxy_twist.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--user", help="run as this user (overrides the config's `user`)")
    parser.add_argument("--group", help="... and group")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    from .reactor import install

    install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from . import config as configuration
    from . import privileges

    privileges.die_with_parent(signal.SIGTERM)
    # JSON log events on stdout: the master re-emits them into its own log.
    sys.stdout.reconfigure(line_buffering=True)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    status = os.fdopen(STATUS_FD, "w", buffering=1) if _is_open(STATUS_FD) else None

    def report(state: str) -> None:
        if status is not None:
            try:
                status.write(f"{state}\n")
            except OSError:
                pass  # the master is gone; PDEATHSIG will follow

    # Everything the relay needs is imported now: after the switch to an
    # unprivileged user, the interpreter's own directories may be unreadable.
    from .http import relay  # noqa: F401
    from .metrics import PortMetrics  # noqa: F401
    from .tls import layer  # noqa: F401

    try:
        config = configuration.load(args.config)
        if args.user is not None:
            config = configuration.with_identity(config, args.user, args.group)
        service = ProxyService(config, reactor)
        access_log = _open_access_log(config, reactor)  # as root: like nginx, open first
        service.access_log = access_log
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
        report(f"failed {e}")
        return 3

    # Reload is the master's business: a SIGHUP sent to the whole process
    # group (a closing terminal, `timeout`) must not kill the workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if access_log is not None:
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(access_log.reopen))
    else:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    draining = []

    @defer.inlineCallbacks
    def drain_and_exit():
        if draining:
            return
        draining.append(True)
        report("draining")
        log.info("draining (up to {t}s)", t=config.drain_timeout)
        try:
            yield service.drain(config.drain_timeout)
            if access_log is not None:
                yield defer.maybeDeferred(access_log.close)
        finally:
            reactor.stop()

    def on_signal(number, frame):
        reactor.callFromThread(drain_and_exit)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start():
        try:
            service.startService()
        except Exception:
            # Listening sockets nobody accepts on would swallow connections.
            log.failure("worker {index} failed to start", index=args.index)
            report("failed start-up error")
            os._exit(3)
        report("ready")

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
