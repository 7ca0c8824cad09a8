"""
The worker on a fake reactor (MemoryReactorClock): binding in
privilegedStartService, accepting within the connection budget, draining in
stopService, heartbeats and the master's pipe.  The real process is covered
end to end in tests/e2e/test_workers.py.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from tproxy_twist import config as C
from tproxy_twist.testing import FakeTransport, tcp_address
from tproxy_twist.worker import MasterLink, ProxyService, StartupError

FORWARD = """\
[metrics]
listen = ""

[[port]]
name = "forward"
listen = "127.0.0.1:{port}"
mode = "forward"
allow = ["127.0.0.0/8"]
"""


class FakeListener:
    """A listening socket with plenty of connections queued (or an error to raise)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.error: OSError | None = None

    def accept(self):
        if self.error is not None:
            raise self.error
        self.accepted += 1
        return object(), ("127.0.0.1", 40000 + self.accepted)


class FakePort:
    """What ProxyService and its accept loop use of tcp.Port."""

    def __init__(self, factory, reactor) -> None:
        self.factory = factory
        self.reactor = reactor
        self.socket = FakeListener()
        self.reading = True
        self.connected = True
        self.numberAccepts = 100
        self.sessionno = 0
        self.stopped = False

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def stopListening(self) -> None:
        self.stopped = True
        self.connected = False
        self.reading = False

    def _buildAddr(self, addr):
        return tcp_address(*addr)

    def transport(self, sock, protocol, addr, port, session, reactor):
        return FakeTransport(tcp_address("127.0.0.1", 3128), tcp_address(*addr))

    def doRead(self) -> None:
        raise AssertionError("replaced by the worker's accept loop")


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def adoptStreamPort(self, fileno, addressFamily, factory):
        super().adoptStreamPort(fileno, addressFamily, factory)
        port = FakePort(factory, self)
        self.ports.append(port)
        return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service(text: str | None = None, **kwargs) -> tuple[ProxyService, Reactor]:
    text = text or FORWARD.format(port=free_port())
    reactor = Reactor()
    return ProxyService(C.loads(text), reactor, **kwargs), reactor


def serving(text: str | None = None, **kwargs) -> tuple[ProxyService, Reactor, FakePort]:
    """A started service with one port, and that port."""
    proxy, reactor = service(text, **kwargs)
    proxy.privilegedStartService()
    proxy.startService()
    [port] = reactor.ports
    return proxy, reactor, port


def test_privileged_start_binds_every_port_and_start_accepts_on_them():
    proxy, reactor = service()
    proxy.privilegedStartService()
    assert reactor.adoptedPorts == []  # bound, not accepting yet
    proxy.startService()
    [(fileno, family, factory)] = reactor.adoptedPorts
    assert family == socket.AF_INET
    assert factory.port.name == "forward"
    proxy.stopService()


def test_a_port_in_use_is_a_startup_error_naming_the_port_and_the_reason():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proxy, reactor = service(FORWARD.format(port=port))
        with pytest.raises(
            StartupError, match=rf"cannot listen on 127.0.0.1:{port} \(port 'forward'\)"
        ):
            proxy.privilegedStartService()


def test_a_full_budget_pauses_every_port_and_one_closing_resumes_them():
    proxy, reactor, port = serving(max_connections=3)
    port.doRead()
    assert port.socket.accepted == 3  # never more than the free slots in one batch
    assert proxy.budget.used == 3
    assert not port.reading
    next(iter(proxy.factories[0].connections)).transport.loseConnection()
    connection = next(iter(proxy.factories[0].connections))
    connection.connectionLost(None)
    assert proxy.budget.used == 2 and port.reading
    proxy.stopService()


def test_a_read_event_with_a_full_budget_accepts_nothing():
    proxy, reactor, port = serving(max_connections=2)
    port.doRead()
    port.doRead()  # already queued in this reactor turn: must not overshoot
    assert port.socket.accepted == 2
    assert proxy.budget.used == 2
    proxy.stopService()


def _warnings(seen: list[dict]) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in seen if e.get("log_level") == LogLevel.warn]


def test_out_of_descriptors_a_port_pauses_accepting_and_says_so_once_per_interval():
    import errno

    from twisted.logger import globalLogPublisher

    from tproxy_twist.sockets import ACCEPT_PAUSE

    proxy, reactor, port = serving()
    paused: list[str] = []
    proxy.factories[0].metrics.accept_paused = paused.append
    port.socket.error = OSError(errno.EMFILE, "Too many open files")
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for _ in range(30):  # 15 s of readiness events, each a shortage
            port.doRead()
            assert not port.reading  # no busy loop: the listener is not watched
            reactor.advance(ACCEPT_PAUSE)
            assert port.reading  # tried again after the pause
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [line for line in _warnings(seen) if "cannot accept" in line]
    assert len(lines) == 2, lines  # one per 10 s; the second counts the ones held back
    assert "port 'forward'" in lines[0] and "Too many open files" in lines[0]
    assert "RLIMIT_NOFILE" in lines[0] and "max_connections" in lines[0]
    assert "19 more like this" in lines[1]
    assert paused == ["EMFILE"] * 30  # every pause counted (tproxy_accept_paused_total)
    port.socket.error = None
    port.doRead()
    assert proxy.budget.used > 0  # accepting again
    proxy.stopService()


def test_an_accept_pause_is_a_recent_problem_on_the_status_page_once_per_interval():
    import errno

    from tproxy_twist.sockets import ACCEPT_PAUSE

    text = FORWARD.format(port=free_port()).replace('listen = ""', 'listen = "127.0.0.1:9464"', 1)
    proxy, reactor, port = serving(text)
    port.socket.error = OSError(errno.EMFILE, "Too many open files")
    for _ in range(30):  # 15 s
        port.doRead()
        reactor.advance(ACCEPT_PAUSE)
    problems = [(p.port, p.kind, p.reason) for p in proxy.problems.recent()]
    assert problems == [("forward", "accept_paused", "EMFILE")] * 2
    proxy.stopService()


def test_a_paused_port_stays_paused_when_the_budget_filled_or_the_port_closed_meanwhile():
    import errno

    from tproxy_twist.sockets import ACCEPT_PAUSE

    proxy, reactor, port = serving(max_connections=2)
    port.numberAccepts = 2
    port.doRead()  # the budget is full now
    assert proxy.budget.used == 2 and not port.reading
    port.socket.error = OSError(errno.ENFILE, "Too many open files in system")
    port.doRead()  # a readiness event from before the pause: nothing accepted
    reactor.advance(ACCEPT_PAUSE)
    assert not port.reading  # the budget's pause holds
    proxy.stopService()
    reactor.advance(ACCEPT_PAUSE)
    assert not port.reading and port.stopped


def test_a_connection_gone_before_accept_is_skipped_and_the_batch_goes_on():
    import errno

    proxy, reactor, port = serving(max_connections=5)
    listener = port.socket
    accept = listener.accept
    errors = [OSError(errno.ECONNABORTED, "aborted")]

    def accept_after_one_abort():
        if errors:
            raise errors.pop()
        return accept()

    listener.accept = accept_after_one_abort
    port.doRead()
    assert proxy.budget.used == 5 and not port.reading  # budget full: paused by it
    proxy.stopService()


def test_an_error_while_accepting_is_logged_and_the_listener_stays_open():
    from twisted.logger import globalLogPublisher

    proxy, reactor, port = serving()

    def broken(addr):
        raise RuntimeError("a bug in buildProtocol")

    port.factory.buildProtocol = broken
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        port.doRead()  # does not raise: the reactor would close the listener
        port.doRead()  # the same bug again: counted, not logged again within 10 s
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert sum(e.get("log_failure") is not None for e in seen) == 1
    assert port.reading and not port.stopped
    proxy.stopService()


def test_stop_service_stops_accepting_and_returns_a_deferred_that_fires_when_drained():
    proxy, reactor, port = serving()
    done = proxy.stopService()
    assert port.stopped
    assert done.called  # nothing in flight


def test_stop_service_waits_for_in_flight_requests_until_the_drain_timeout():
    text = "drain_timeout = 5\n" + FORWARD.format(port=free_port())
    proxy, reactor, port = serving(text)
    port.numberAccepts = 1
    port.doRead()
    [connection] = proxy.factories[0].connections
    connection.dataReceived(b"GET http://198.51.100.7/ HTTP/1.1\r\nHost: 198.51.100.7\r\n\r\n")
    done = proxy.stopService()
    reactor.advance(1)
    assert not done.called  # a request is in flight
    for _ in range(30):
        reactor.advance(0.2)
    assert done.called  # aborted at the drain timeout
    assert connection.transport.disconnecting


def test_stop_before_start_closes_the_bound_sockets():
    proxy, reactor = service()
    proxy.privilegedStartService()
    sockets = [sock for _, sock in proxy._sockets]
    proxy.stopService()
    assert all(sock.fileno() == -1 for sock in sockets)


# --- the link to the master -----------------------------------------------------------


def read_all(fd: int) -> str:
    try:
        return os.read(fd, 1 << 20).decode()
    except BlockingIOError:
        return ""


def test_the_heartbeat_is_written_from_the_reactor_every_interval():
    reactor = MemoryReactorClock()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    link = MasterLink(write_end, reactor, lambda: None, interval=1.0)
    link.startService()
    link.report("ready")
    reactor.advance(1)
    reactor.advance(1)
    assert read_all(read_end) == "alive\nready\nalive\nalive\n"
    link.stopService()
    reactor.advance(5)
    assert read_all(read_end) == ""
    os.close(read_end), os.close(write_end)


def test_a_master_that_does_not_read_never_blocks_the_worker():
    reactor = MemoryReactorClock()
    read_end, write_end = os.pipe()
    gone = []
    link = MasterLink(write_end, reactor, lambda: gone.append(True), interval=1.0)
    for _ in range(100_000):  # far more than a pipe holds
        link.report("alive")
    assert gone == []
    os.close(read_end), os.close(write_end)


def test_the_master_closing_the_pipe_means_it_is_gone():
    reactor = MemoryReactorClock()
    gone = []
    read_end, write_end = os.pipe()
    link = MasterLink(None, reactor, lambda: gone.append(True), master_fd=read_end)
    link.startService()
    [pipe] = reactor.getReaders()
    assert pipe.doRead() is None and gone == []  # nothing to read yet: still there
    os.close(write_end)
    reason = pipe.doRead()
    assert reason is not None  # the reactor removes it and calls connectionLost
    pipe.connectionLost(reason)
    assert gone == [True]
    link.stopService()
    os.close(read_end)


def test_a_status_pipe_that_fails_means_the_master_is_gone():
    reactor = MemoryReactorClock()
    read_end, write_end = os.pipe()
    os.close(read_end)
    gone = []
    link = MasterLink(write_end, reactor, lambda: gone.append(True))
    link.report("ready")  # EPIPE (Python ignores SIGPIPE)
    reactor.advance(0)
    assert gone == [True]
    os.close(write_end)


# What the worker's __main__ leaves importable: run it (with a configuration
# that does not exist, so it stops at once) and look at what it imported.
_WORKER_IMPORTS = """
import runpy, sys
sys.argv = ["tproxy_twist.worker", "--config", "/nonexistent/tproxy.toml", *sys.argv[1:]]
try:
    runpy.run_module("tproxy_twist.worker", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 3, e.code
from twisted.internet import tcp
print("RESULT", sys.modules.get("OpenSSL") is not None, hasattr(tcp.Connection, "startTLS"))
"""


@pytest.mark.parametrize("flag, tls", [((), False), (("--bump",), True)])
def test_only_a_worker_started_to_bump_can_start_tls(flag, tls):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", _WORKER_IMPORTS, *flag],
        capture_output=True,
        cwd=Path(__file__).parents[2],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    (line,) = [x for x in result.stdout.decode().splitlines() if x.startswith("RESULT ")]
    assert line.split()[1:] == [str(tls), str(tls)]


# -- the heap after start-up (bench/README.md, "Added latency") ----------------


@pytest.fixture
def unfrozen():
    """Whatever a test froze goes back to the collector's ordinary generations."""
    import gc

    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settling_the_heap_collects_start_up_garbage_then_freezes_what_is_alive(unfrozen):
    import gc
    import weakref

    from tproxy_twist.worker import settle_heap

    garbage = _Cycle()
    gone = weakref.ref(garbage)
    alive = _Cycle()
    del garbage
    settle_heap()
    assert gone() is None  # collected, not frozen forever
    assert gc.get_freeze_count() > 0
    # What was alive is in the permanent generation: a full collection no longer walks it.
    assert not any(o is alive for o in gc.get_objects())


class _RecordingLink:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def set_sources(self, connections, problems) -> None:
        self.calls.append("sources")

    def startService(self) -> None:
        self.calls.append("heartbeat")

    def report(self, state: str) -> None:
        self.calls.append(state)


def test_a_worker_settles_its_heap_once_it_accepts_and_before_it_says_ready():
    from tproxy_twist.worker import start_serving

    proxy, reactor = service()
    proxy.privilegedStartService()
    calls: list[str] = []

    def settle() -> None:
        calls.append(f"settle after {len(reactor.adoptedPorts)} port(s)")

    start_serving(proxy, _RecordingLink(calls), settle=settle)
    assert calls == ["sources", "heartbeat", "settle after 1 port(s)", "ready"]
    proxy.stopService()


def test_a_worker_that_starts_serving_has_frozen_its_start_up_heap(unfrozen):
    import gc

    from tproxy_twist.worker import start_serving

    proxy, reactor = service()
    proxy.privilegedStartService()
    gc.unfreeze()
    start_serving(proxy, _RecordingLink([]))
    assert gc.get_freeze_count() > 0
    assert not any(o is proxy for o in gc.get_objects())  # frozen: never walked again
    proxy.stopService()


def test_a_workers_log_leaves_debug_events_out_and_passes_info_and_above_as_json():
    import io
    import json

    from twisted.logger import Logger

    from tproxy_twist.worker import log_observer

    stream = io.StringIO()
    logger = Logger(namespace="test", observer=log_observer(stream))
    for n in range(100):
        logger.debug("splice ended by fd {fd}", fd=n)
    logger.info("listening on {port}", port=3129)
    logger.error("went wrong")
    lines = stream.getvalue().split("\n")[:-1]  # one event per line, each after a \x1e
    events = [json.loads(line.lstrip("\x1e")) for line in lines]
    assert [(e["log_format"], e["log_level"]["name"]) for e in events] == [
        ("listening on {port}", "info"),
        ("went wrong", "error"),
    ]
