"""
The worker supervisor with a fake reactor: spawning, respawn back-off,
reload generations and stopping, without real processes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tproxy_twist import config as C
from tproxy_twist.master import WorkerSupervisor, _Health, check_bump_kit
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
    metrics.mkdir(exist_ok=True)
    supervisor = WorkerSupervisor(C.load(path), tmp_path, reactor, metrics)
    supervisor.fatal = []
    supervisor.on_fatal = supervisor.fatal.append
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


def test_after_the_first_generation_was_up_a_failing_respawn_backs_off_exponentially(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    ready(supervisor.current[1])
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
    assert supervisor.fatal == []


def test_every_worker_of_the_first_generation_failing_is_fatal_and_names_the_reason(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    for worker in list(supervisor.current.values()):
        worker.childDataReceived(
            3, b"failed cannot listen on 0.0.0.0:3128: Address already in use\n"
        )
        exit_(worker, code=3)
    [reason] = supervisor.fatal
    assert "every worker of generation 1 failed to start" in reason
    assert reason.count("Address already in use") == 1  # the same way: said once
    reactor.advance(60)
    assert len(reactor.spawned) == 2  # nothing retried


def test_one_worker_failing_at_start_while_another_is_ready_is_retried(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    ready(supervisor.current[1])
    exit_(supervisor.current[2], code=3)
    reactor.advance(0.5)
    assert supervisor.fatal == []
    assert len(reactor.spawned) == 3


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
    # It may be accepting already: drained, not killed.
    assert other.transport.signals == [signal.SIGTERM]
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


def test_a_bad_config_is_said_alone_in_one_line_naming_the_file_and_key(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG + "speling = 1\n")
    with pytest.raises(SystemExit) as raised:
        Options().parseOptions(["--config", str(path)])
    message = str(raised.value.code)
    assert message.startswith(f"tproxy-twist: {path}: port[0].speling: unknown key")
    assert "\n" not in message


# --- heartbeats ---------------------------------------------------------------------


def beat(worker) -> None:
    worker.childDataReceived(3, b"alive\n")


def test_a_silent_worker_is_not_ready_within_seconds_then_killed_and_replaced_after_the_grace(
    tmp_path,
):
    from twisted.web.test.requesthelper import DummyRequest

    supervisor, reactor = make(tmp_path, workers=2, text="heartbeat_grace = 8\n" + CONFIG)
    first, second = supervisor.current.values()
    ready(first), ready(second)
    reactor.advance(60)  # a long, steady life with heartbeats
    for _ in range(4):  # the second worker stops: only the first still beats
        beat(first)
        reactor.advance(1)
    assert second.silent and not first.silent
    assert supervisor.ready_count() == 1 and not supervisor.all_ready()
    request = DummyRequest([b""])
    text = _Health(supervisor).render_GET(request)
    assert request.responseCode == 503
    assert f"worker 2 (pid {second.pid}): no heartbeat".encode() in text
    assert second.transport.signals == []  # not killed before the grace
    for _ in range(4):
        beat(first)
        reactor.advance(1)
    assert second.transport.signals == [signal.SIGKILL]
    exit_(second, code=None, sig=9)
    reactor.advance(0)
    assert supervisor.current[2] is not second  # replaced at once: it had run steadily
    assert first.transport.signals == []


def test_a_worker_that_speaks_again_before_the_grace_is_ready_again(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    worker = supervisor.current[1]
    ready(worker)
    for _ in range(4):
        reactor.advance(1)
    assert worker.silent and supervisor.ready_count() == 0
    beat(worker)  # SIGCONT
    assert not worker.silent and supervisor.all_ready()
    reactor.advance(1)
    assert worker.transport.signals == []


def test_a_master_that_did_not_run_for_a_while_does_not_take_its_workers_for_hung(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    worker = supervisor.current[1]
    ready(worker)
    reactor.advance(1)
    # The master was stopped for 30 s: its heartbeat check runs before it reads the pipes.
    reactor.advance(30)
    assert not worker.silent and worker.transport.signals == []
    beat(worker)
    reactor.advance(1)
    assert supervisor.all_ready()


def test_workers_that_are_starting_or_draining_are_not_judged_by_heartbeat(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    reactor.advance(20)
    assert supervisor.current[1].transport.signals == []


# --- reloads ------------------------------------------------------------------------------


def test_reloads_while_a_generation_starts_coalesce_into_one_more_generation(tmp_path):
    supervisor, reactor = make(tmp_path, workers=2)
    for worker in supervisor.current.values():
        ready(worker)
    for _ in range(10):  # ten SIGHUPs in quick succession
        supervisor.reload(supervisor.config)
    assert len(reactor.spawned) == 4  # generation 2 only, so far
    second = list(supervisor.pending.values())
    for worker in second:
        ready(worker)
    assert supervisor.generation == 2
    third = list(supervisor.pending.values())  # the coalesced reloads, once
    assert {w.generation for w in third} == {3}
    for worker in third:
        ready(worker)
    assert supervisor.generation == 3 and supervisor.pending is None
    assert len(reactor.spawned) == 6
    assert all(w.transport.signals == [signal.SIGTERM] for w in second)  # drained


def test_a_reload_queued_behind_a_failing_generation_still_runs(tmp_path):
    supervisor, reactor = make(tmp_path, workers=1)
    ready(supervisor.current[1])
    supervisor.reload(supervisor.config)
    supervisor.reload(supervisor.config)
    exit_(supervisor.pending[1], code=3)
    assert supervisor.pending is not None
    assert {w.generation for w in supervisor.pending.values()} == {2}


# --- whatever fails in the exit handler, the worker is replaced ----------------------------


def test_a_worker_is_replaced_even_when_its_metrics_files_cannot_be_tidied(tmp_path, monkeypatch):
    from tproxy_twist import master

    def broken(metrics_dir, pid):
        raise PermissionError(13, "Permission denied", str(metrics_dir))

    monkeypatch.setattr(master, "retire_metric_files", broken)
    supervisor, reactor = make(tmp_path, workers=2)
    for worker in supervisor.current.values():
        ready(worker)
    reactor.advance(60)
    exit_(supervisor.current[1], code=None, sig=9)
    reactor.advance(0)
    assert len(supervisor.current) == 2
    assert len(reactor.spawned) == 3


def test_dead_workers_metric_files_fold_into_one_archive_and_totals_stay(tmp_path):
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from tproxy_twist.master import retire_metric_files

    key = mmap_key("tproxy_connections", "tproxy_connections_total", ["port"], ["p"], "help")
    for pid in (101, 102, 103):
        f = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        f.write_value(key, 10.0 * pid, 0.0)
        f.close()
        live = MmapedDict(str(tmp_path / f"gauge_livesum_{pid}.db"))
        live.close()
    retire_metric_files(tmp_path, 101)
    retire_metric_files(tmp_path, 102)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["counter_103.db", "counter_archive.db", "gauge_livesum_103.db"]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("tproxy_connections_total", {"port": "p"}) == 3060.0


# --- the metrics listener and the runtime directory -----------------------------------------


def master_service(tmp_path, monkeypatch, reactor, text: str = CONFIG):
    from tproxy_twist.master import MasterService

    metrics = tmp_path / "run" / "metrics"
    metrics.mkdir(parents=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics))
    path = tmp_path / "tproxy.toml"
    path.write_text(text)
    return MasterService(C.load(path), reactor=reactor)


def test_the_metrics_listener_is_a_service_child_that_binds_before_any_worker(
    tmp_path, monkeypatch
):
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    service = master_service(
        tmp_path, monkeypatch, reactor, '[metrics]\nlisten = "[::1]:9999"\n' + CONFIG
    )
    service.privilegedStartService()
    [(port, _factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (9999, "::1")
    assert service.getServiceNamed("metrics [::1]:9999") is not None


def test_a_metrics_address_in_use_stops_the_start_with_one_line_before_any_worker(
    tmp_path, monkeypatch
):
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import RaisingMemoryReactor

    taken = CannotListenError("127.0.0.1", 9464, OSError(98, "Address already in use"))
    reactor = RaisingMemoryReactor(listenException=taken)
    service = master_service(tmp_path, monkeypatch, reactor)
    with pytest.raises(SystemExit) as raised:
        service.privilegedStartService()
    message = str(raised.value.code)
    assert message.startswith("tproxy-twist: cannot listen for metrics on 127.0.0.1:9464")
    assert message.endswith("Address already in use") and "\n" not in message
    assert service.supervisor.current == {}


def test_runtime_dirs_of_masters_that_are_gone_are_removed_and_running_ones_kept(tmp_path):
    import os

    from tproxy_twist.master import _start_time, remove_stale_runtime_dirs

    mine = tmp_path / f"tproxy-twist-{os.getpid()}.{_start_time(os.getpid())}"
    reused = tmp_path / f"tproxy-twist-{os.getpid()}.1"  # our pid, another start time
    gone = tmp_path / "tproxy-twist-999999999.5"
    other = tmp_path / "tproxy-twist-unrelated"
    for path in (mine, reused, gone, other):
        (path / "metrics").mkdir(parents=True)
    removed = remove_stale_runtime_dirs(tmp_path)
    assert sorted(removed) == sorted([reused, gone])
    assert mine.exists() and other.exists()


def test_a_reload_that_moves_the_metrics_listener_replaces_the_service_child(tmp_path, monkeypatch):
    from twisted.internet.testing import MemoryReactorClock

    class Reactor(MemoryReactorClock):
        spawnProcess = FakeReactor.spawnProcess

        def __init__(self) -> None:
            super().__init__()
            self.spawned = []
            self._pids = iter(range(1000, 100000))

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # SIGHUP, SIGUSR1 handlers
    reactor = Reactor()
    text = '[metrics]\nlisten = "127.0.0.1:9001"\n' + CONFIG
    service = master_service(tmp_path, monkeypatch, reactor, text)
    service.privilegedStartService()
    service.startService()
    (tmp_path / "tproxy.toml").write_text(text.replace("9001", "9002"))
    service.reload()
    assert [(port, host) for port, _, _, host in reactor.tcpServers] == [
        (9001, "127.0.0.1"),
        (9002, "127.0.0.1"),
    ]
    names = {child.name for child in service}
    assert "metrics 127.0.0.1:9002" in names and "metrics 127.0.0.1:9001" not in names
    assert service.supervisor.pending is not None  # and the workers reload


BUMP_PORT = (
    '[[port]]\nname = "tls"\nlisten = "[::]:3130"\nmode = "tproxy"\nprotocol = "tls"\n'
    '[port.tls]\ndefault = "bump"\n'
)


def _bump_config(tmp_path, key_mode: int = 0o600) -> C.Config:
    from tproxy_twist.tls.ca import create_ca, write_ca
    from tproxy_twist.tls.testing import now_utc

    key, certificate = create_ca("master test CA", now_utc())
    write_ca(key, certificate, str(tmp_path / "ca.pem"), str(tmp_path / "ca.key"))
    os.chmod(tmp_path / "ca.key", key_mode)
    path = tmp_path / "tproxy.toml"
    path.write_text(
        f'[tls]\nca_cert = "{tmp_path}/ca.pem"\nca_key = "{tmp_path}/ca.key"\n' + BUMP_PORT
    )
    return C.load(path)


def test_workers_may_start_tls_only_when_a_tls_port_may_bump(tmp_path):
    _, reactor = make(tmp_path, workers=1)
    assert "--bump" not in reactor.spawned[0][1]
    (tmp_path / "bump").mkdir()
    config = _bump_config(tmp_path / "bump")
    _, reactor = make(tmp_path / "bump", workers=1, text=open(config.path).read())
    assert reactor.spawned[0][1][-1] == "--bump"


def _now() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


def test_the_master_checks_the_ca_of_a_bumping_config_and_names_the_file_and_key(tmp_path):
    (tmp_path / "good").mkdir()
    check_bump_kit(_bump_config(tmp_path / "good"), _now())  # a good CA: nothing to say
    loose = _bump_config(tmp_path, key_mode=0o640)
    with pytest.raises(C.ConfigError) as e:
        check_bump_kit(loose, _now())
    assert str(e.value).startswith(f"{loose.path}: tls.ca_key: {tmp_path}/ca.key")
    assert "chmod 600" in str(e.value)


def test_a_config_that_does_not_bump_needs_no_ca(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text('[tls]\nca_cert = "/nonexistent/ca.pem"\n' + CONFIG)
    check_bump_kit(C.load(path), Clock())
