"""
The worker supervisor with a fake reactor: spawning, respawn back-off,
reload generations and stopping, without real processes.
"""

from __future__ import annotations

import signal

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tproxy_twist import config as C
from tproxy_twist.master import WorkerSupervisor, _Health
from tproxy_twist.tap import Options, _take_twistd_identity

CONFIG = '[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n'


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, number: int) -> None:
        self.signals.append(number)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned = []
        self._pids = iter(range(1000, 100000))

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        transport = FakeProcessTransport(next(self._pids))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env, childFDs))
        return transport


def make(tmp_path, workers: int = 3, text: str = CONFIG) -> tuple[WorkerSupervisor, FakeReactor]:
    path = tmp_path / "tproxy.toml"
    path.write_text(f"workers = {workers}\ndrain_timeout = 10\n" + text)
    reactor = FakeReactor()
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    supervisor = WorkerSupervisor(C.load(path), tmp_path, reactor, metrics)
    supervisor.startService()
    return supervisor, reactor


def ready(worker) -> None:
    worker.childDataReceived(3, b"ready\n")


def exit_(worker, code: int | None = 1, sig: int | None = None) -> None:
    if code == 0:
        reason = error.ProcessDone(0)
    else:
        reason = error.ProcessTerminated(exitCode=code, signal=sig)
    worker.processEnded(Failure(reason))


def test_start_spawns_fresh_interpreters_with_the_metrics_dir_and_a_config_snapshot(tmp_path):
    supervisor, reactor = make(tmp_path)
    assert len(reactor.spawned) == 3
    for index, (_, args, env, fds) in enumerate(reactor.spawned, 1):
        assert args[1:3] == ["-m", "tproxy_twist.worker"]
        assert args[args.index("--index") + 1] == str(index)
        snapshot = args[args.index("--config") + 1]
        assert open(snapshot).read().endswith(CONFIG)
        assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
        assert fds[3] == "r"  # the status pipe


def test_health_is_ready_only_when_every_worker_reported_ready(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    assert not supervisor.all_ready()
    for worker in supervisor.current.values():
        ready(worker)
    assert supervisor.all_ready() and supervisor.ready_count() == 2


def test_a_worker_that_dies_after_running_steadily_is_replaced_at_once(tmp_path):
    supervisor, reactor = make(tmp_path)
    for worker in supervisor.current.values():
        ready(worker)
    reactor.advance(60)
    victim = supervisor.current[2]
    exit_(victim, code=None, sig=9)
    assert 2 not in supervisor.current
    reactor.advance(0)
    assert supervisor.current[2] is not victim
    assert len(reactor.spawned) == 4


def test_a_worker_that_keeps_dying_at_start_backs_off_exponentially(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    delays = []
    for _ in range(8):
        worker = supervisor.current[1]
        worker.childDataReceived(2, b"cannot listen on [::]:3129: Address already in use\n")
        exit_(worker, code=3)
        spawned = len(reactor.spawned)
        waited = 0.0
        while len(reactor.spawned) == spawned:
            reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[7] == 30.0  # capped


def test_reload_retires_the_old_generation_only_once_the_new_one_is_ready(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    old = list(supervisor.current.values())
    for worker in old:
        ready(worker)
    supervisor.reload(supervisor.config)
    new = list(supervisor.pending.values())
    assert len(new) == 2
    ready(new[0])
    assert all(w.transport.signals == [] for w in old)  # not before all are ready
    ready(new[1])
    assert all(w.transport.signals == [signal.SIGTERM] for w in old)
    assert list(supervisor.current.values()) == new
    assert supervisor.generation == 2
    for worker in old:
        exit_(worker, code=0)
    assert len(reactor.spawned) == 4  # draining workers are not respawned


def test_reload_whose_worker_fails_keeps_the_running_generation(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    old = dict(supervisor.current)
    for worker in old.values():
        ready(worker)
    supervisor.reload(supervisor.config)
    failing = supervisor.pending[1]
    exit_(failing, code=3)
    assert supervisor.pending is None
    assert supervisor.current == old
    assert supervisor.pending is None
    other = [p for p, *_ in reactor.spawned[-2:] if p is not failing][0]
    assert other.transport.signals == [signal.SIGKILL]
    assert all(w.transport.signals == [] for w in old.values())


def test_reload_whose_workers_never_get_ready_times_out(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    ready(supervisor.current[1])
    supervisor.reload(supervisor.config)
    pending = supervisor.pending[1]
    reactor.advance(31)
    assert supervisor.pending is None
    assert signal.SIGKILL in pending.transport.signals
    assert supervisor.current[1].transport.signals == []


def test_stop_drains_every_worker_and_kills_stragglers_after_the_drain_timeout(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    first, second = supervisor.current.values()
    done = supervisor.stopService()
    assert first.transport.signals == [signal.SIGTERM] == second.transport.signals
    exit_(first, code=0)
    assert not done.called
    reactor.advance(15.1)
    assert second.transport.signals == [signal.SIGTERM, signal.SIGKILL]
    exit_(second, code=None, sig=9)
    assert done.called
    assert len(reactor.spawned) == 2  # nothing respawned while stopping


def test_worker_log_events_are_reemitted_with_the_worker_index(tmp_path):
    from twisted.logger import globalLogPublisher

    supervisor, reactor = make(tmp_path, workers=1)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        from twisted.logger import LogLevel, eventAsJSON

        event = {"log_format": "hello {who}", "who": "there", "log_level": LogLevel.info}
        line = b"\x1e" + eventAsJSON(event).encode() + b"\n"
        supervisor.current[1].childDataReceived(1, line[:20])
        supervisor.current[1].childDataReceived(1, line[20:])
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("who") == "there"]
    assert event["log_system"] == "worker 1"


def test_healthz_answers_503_until_all_workers_are_ready(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    supervisor, reactor = make(tmp_path, workers=2)
    health = _Health(supervisor)
    request = DummyRequest([b""])
    assert b"0/2 workers ready" in health.render_GET(request)
    assert request.responseCode == 503
    for worker in supervisor.current.values():
        ready(worker)
    request = DummyRequest([b""])
    health.render_GET(request)
    assert request.responseCode in (None, 200)


def test_twistd_uid_and_gid_go_to_the_workers_and_the_master_keeps_root(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG)
    options = Options()
    options.parseOptions(["--config", str(path)])
    options.parent = {"uid": 65534, "gid": 65534}
    config = _take_twistd_identity(options, options["loaded"])
    assert config.user == "nobody"
    assert options.parent == {"uid": None, "gid": None}


def test_a_bad_config_is_a_usage_error_naming_the_key(tmp_path):
    from twisted.python import usage

    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG + "speling = 1\n")
    with pytest.raises(usage.UsageError, match="speling: unknown key"):
        Options().parseOptions(["--config", str(path)])
