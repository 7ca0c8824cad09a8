"""
The process that serves traffic: one listener per configured port, each
feeding a L{ProxyFactory}, plus (for now, in a single process) the
metrics listener.
"""

from __future__ import annotations

import errno
import socket

from twisted.application.service import Service
from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from .config import Config, PortConfig
from .http.relay import ProxyFactory, RelaySettings
from .metrics import PortMetrics
from .sockets import LocalAddresses, connect_upstream, listening_socket, probe_transparent_bind

log = Logger()


class StartupError(Exception):
    """The proxy cannot start; the message tells the operator what to do."""


def check_tproxy_support(config: Config) -> None:
    """
    Squid's start-up probe: a tproxy port is useless if a transparent socket
    cannot bind a foreign address, so refuse to start rather than answer
    every request with 502.
    """
    families = {p.listen.family for p in config.ports if p.mode == "tproxy"}
    if socket.AF_INET6 in families:
        families.add(socket.AF_INET)  # a [::] listener serves IPv4 clients too
    for family in sorted(families):
        problem = probe_transparent_bind(family)
        if problem is None:
            continue
        name = "IPv6" if family == socket.AF_INET6 else "IPv4"
        hint = (
            "run as root or grant CAP_NET_ADMIN (or CAP_NET_RAW)"
            if problem.errno in (errno.EPERM, errno.EACCES)
            else "the kernel needs TPROXY support (NETFILTER_XT_TARGET_TPROXY / nft_tproxy)"
        )
        raise StartupError(
            f"TPROXY support in the system does not work ({name}: {problem.strerror},"
            f" errno {problem.errno}); {hint}.  Run `tproxy-twist check` for details."
        )


class ProxyService(Service):
    """Listens on every configured port and relays what arrives."""

    def __init__(self, config: Config, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.config = config
        check_tproxy_support(config)
        # Bind now, before twistd may drop privileges and before the reactor
        # runs, so that a port in use is a start-up error, not a log line.
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
        self._metrics_port = None

    def _close_sockets(self) -> None:
        for _, sock in self._sockets:
            sock.close()
        self._sockets = []

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        settings = RelaySettings(
            timeouts=self.config.timeouts,
            limits=self.config.limits,
            pseudonym=socket.gethostname(),
        )
        local = LocalAddresses(reactor)
        connect = connect_upstream(reactor)
        for port, sock in self._sockets:
            factory = ProxyFactory(
                port,
                settings=settings,
                connect=connect,
                clock=reactor,
                local_addresses=local,
                metrics=PortMetrics(port.name, port.mode),
            )
            self._ports.append(reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
            log.info(
                "{mode} port {name!r} listening on {listen}",
                mode=port.mode,
                name=port.name,
                listen=str(port.listen),
            )
        self._close_sockets()  # the reactor holds its own duplicates
        if self.config.metrics_listen is not None:
            self._metrics_port = _listen_metrics(reactor, self.config.metrics_listen)

    def stopService(self):
        super().stopService()
        ports, self._ports = self._ports, []
        if self._metrics_port is not None:
            ports.append(self._metrics_port)
            self._metrics_port = None
        return DeferredList([p.stopListening() for p in ports])


def _listen_metrics(reactor, address):
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource())
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # scrapes are not worth a log line each
    port = reactor.listenTCP(address.port, site, interface=address.host)
    log.info("metrics on http://{listen}/metrics", listen=str(address))
    return port
