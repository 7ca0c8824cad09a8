"""
The access log: Squid's native line and JSON lines for each entry, and the
file writer that keeps disk I/O off the reactor thread, reopens for
logrotate and loses nothing on a clean close.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.accesslog import (
    AccessEntry,
    FileAccessLog,
    JSONFormatter,
    SquidFormatter,
    formatter_for,
    open_access_log,
)
from tproxy_twist.http.relay import ProxyFactory, RelaySettings
from tproxy_twist.metrics import PortMetrics
from tproxy_twist.testing import FakeConnect, FakeTransport, tcp_address

# Squid's native format, as log analysers parse it (one field per token).
SQUID_LINE = re.compile(
    r"^ *(?P<time>\d+\.\d{3}) +(?P<elapsed>\d+) (?P<client>\S+)"
    r" (?P<result>[A-Z_]+)/(?P<status>\d{3}) (?P<bytes>\d+) (?P<method>\S+) (?P<url>\S+)"
    r" (?P<user>\S+) (?P<hierarchy>HIER_[A-Z]+)/(?P<server>\S+) (?P<type>.+)$"
)


def entry(**changes) -> AccessEntry:
    fields = dict(
        time=1700000000.1239,
        duration=0.2504,
        client="198.51.100.2",
        port="transparent",
        mode="tproxy",
        method="GET",
        url="http://example.com/index.html",
        status=200,
        bytes_out=1432,
        bytes_in=78,
        destination="203.0.113.2:80",
        result="TCP_MISS",
        content_type="text/html",
    )
    fields.update(changes)
    return AccessEntry(**fields)


# --- Squid's native format ------------------------------------------------------------


def test_squid_line_has_squids_fields_in_squids_order():
    assert SquidFormatter()(entry()) == (
        "1700000000.123    250 198.51.100.2 TCP_MISS/200 1432 GET"
        " http://example.com/index.html - HIER_DIRECT/203.0.113.2 text/html"
    )


def test_squid_line_for_an_answer_the_proxy_made_itself_has_no_upstream():
    line = SquidFormatter()(
        entry(
            result="NONE",
            status=400,
            destination=None,
            content_type="text/plain",
            method="-",
            url="-",
        )  # fmt: skip
    )
    assert line.endswith(" NONE/400 1432 - - - HIER_NONE/- text/plain")
    assert SQUID_LINE.match(line)


def test_squid_line_has_the_authenticated_user_in_squids_user_field():
    assert SQUID_LINE.match(SquidFormatter()(entry(user="alice")))["user"] == "alice"
    # A user name is one field whatever it contains.
    match = SQUID_LINE.match(SquidFormatter()(entry(user="al ice%\n")))
    assert match["user"] == "al%20ice%25%0A"
    assert match["hierarchy"] == "HIER_DIRECT"


def test_json_line_has_the_authenticated_user():
    assert json.loads(JSONFormatter()(entry(user="alice")))["user"] == "alice"


def test_squid_line_pads_status_and_elapsed_like_squid():
    line = SquidFormatter()(entry(status=0, duration=12.3456, result="NONE", destination=None))
    match = SQUID_LINE.match(line)
    assert match["status"] == "000"
    assert line.split()[1] == "12346"
    assert SquidFormatter()(entry(duration=0.0)).startswith("1700000000.123      0 ")


def test_squid_line_names_an_ipv6_server_by_its_address():
    line = SquidFormatter()(entry(client="2001:db8:1::2", destination="[2001:db8:2::2]:80"))
    match = SQUID_LINE.match(line)
    assert match["client"] == "2001:db8:1::2"
    assert match["server"] == "2001:db8:2::2"


def test_squid_line_stays_one_line_with_a_fixed_number_of_fields():
    line = SquidFormatter()(
        entry(url="http://example.com/a b\r\nX: y", content_type="text/html; charset=utf-8\n")
    )
    assert "\n" not in line and "\r" not in line
    match = SQUID_LINE.match(line)
    assert match["url"] == "http://example.com/a%20b%0D%0AX:%20y"
    assert match["type"] == "text/html; charset=utf-8%0A"  # Squid keeps Content-Type's spaces


def test_json_line_has_every_field_under_its_own_name():
    line = JSONFormatter()(entry(destination=None))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": 1700000000.1239,
        "duration": 0.2504,
        "client": "198.51.100.2",
        "port": "transparent",
        "mode": "tproxy",
        "method": "GET",
        "url": "http://example.com/index.html",
        "status": 200,
        "bytes_out": 1432,
        "bytes_in": 78,
        "destination": None,
        "result": "TCP_MISS",
        "content_type": "text/html",
        "user": None,
    }


def test_formatter_for_knows_the_config_values_only():
    assert isinstance(formatter_for("squid"), SquidFormatter)
    assert isinstance(formatter_for("json"), JSONFormatter)
    with pytest.raises(ValueError, match="squid or json"):
        formatter_for("combined")


# --- the file ------------------------------------------------------------------------


class ThreadedReactor:
    """The reactor surface FileAccessLog uses; calls from the writer thread are run
    in the test's thread by L{run_until}, as a reactor would."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()
        self.triggers: list[tuple[str, str, object]] = []

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.calls.put((f, args, kwargs))

    def seconds(self) -> float:
        return self.now

    now = 0.0

    def addSystemEventTrigger(self, phase, event, f, *args) -> None:
        self.triggers.append((phase, event, f))

    def run_until(self, deferred, timeout: float = 5.0):
        results = []
        deferred.addBoth(results.append)
        while not results:
            f, args, kwargs = self.calls.get(timeout=timeout)
            f(*args, **kwargs)
        return results[0]


@pytest.fixture
def reactor() -> ThreadedReactor:
    return ThreadedReactor()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_every_entry_is_in_the_file_after_close(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor)
    for i in range(1000):
        access_log.log(entry(url=f"http://example.com/{i}"))
    reactor.run_until(access_log.close())
    written = lines(path)
    assert len(written) == 1000
    assert [SQUID_LINE.match(line)["url"] for line in written] == [
        f"http://example.com/{i}" for i in range(1000)
    ]


def test_the_file_is_appended_to_and_readable_by_the_owner_and_group(tmp_path, reactor):
    path = tmp_path / "access.log"
    path.write_text("earlier line\n")
    access_log = FileAccessLog(str(path), "json", reactor)
    access_log.log(entry())
    reactor.run_until(access_log.close())
    assert lines(path)[0] == "earlier line"
    assert json.loads(lines(path)[1])["client"] == "198.51.100.2"
    new = tmp_path / "new.log"
    reactor2 = ThreadedReactor()
    reactor2.run_until(FileAccessLog(str(new), "squid", reactor2).close())
    assert new.stat().st_mode & 0o777 == 0o640


def test_a_path_that_cannot_be_opened_is_an_error_at_once(tmp_path, reactor):
    with pytest.raises(FileNotFoundError):
        FileAccessLog(str(tmp_path / "no-such-dir" / "access.log"), "squid", reactor)


class RecordingLog(FileAccessLog):
    """Records which thread wrote, and can hold the writer (a stalled disk)."""

    def __init__(self, *args, **kwargs) -> None:
        self.writers: set[int] = set()
        self.chunks: list[bytes] = []
        self.disk = threading.Event()
        self.disk.set()
        super().__init__(*args, **kwargs)

    def _write_all(self, data: bytes, lines: int) -> None:
        self.disk.wait(10)
        self.writers.add(threading.get_ident())
        self.chunks.append(data)
        super()._write_all(data, lines)


def test_log_never_writes_in_the_calling_thread(tmp_path, reactor):
    access_log = RecordingLog(str(tmp_path / "access.log"), "squid", reactor)
    access_log.disk.clear()  # the disk hangs: log() must return all the same
    for _ in range(10):
        access_log.log(entry())
    assert access_log.chunks == []
    access_log.disk.set()
    reactor.run_until(access_log.close())
    assert access_log.writers and threading.get_ident() not in access_log.writers
    assert len(lines(tmp_path / "access.log")) == 10


def test_a_stalled_disk_drops_lines_beyond_the_queue_bound_and_counts_them(tmp_path, reactor):
    dropped = []
    access_log = RecordingLog(
        str(tmp_path / "access.log"), "squid", reactor, max_queued=5, on_dropped=dropped.append
    )
    access_log.disk.clear()
    access_log.log(entry(url="http://example.com/first"))
    # Let the writer take the first line and block on the "disk".
    for _ in range(100):
        if not access_log._queue:
            break
        threading.Event().wait(0.01)
    for i in range(20):
        access_log.log(entry(url=f"http://example.com/{i}"))
    assert access_log.dropped == 15
    assert dropped == [1] * 15
    access_log.disk.set()
    reactor.run_until(access_log.close())
    assert len(lines(tmp_path / "access.log")) == 6


def test_a_full_disk_logs_one_line_per_interval_with_a_count_and_counts_every_lost_entry(
    tmp_path, reactor
):
    from twisted.logger import globalLogPublisher

    lost = []
    events = []
    access_log = FileAccessLog(
        str(tmp_path / "access.log"), "squid", reactor, on_dropped=lost.append
    )
    globalLogPublisher.addObserver(events.append)
    try:
        # What the writer thread hands to the reactor thread for each failed write.
        for i in range(200):
            access_log._write_failed(os.strerror(errno.ENOSPC), 3)
            if i == 100:
                reactor.now += 11  # past the throttle interval
    finally:
        globalLogPublisher.removeObserver(events.append)
    reactor.run_until(access_log.close())
    failures = [e for e in events if "write failed" in e.get("log_format", "")]
    assert len(failures) == 2
    assert failures[1]["suppressed"] == 100
    assert sum(lost) == access_log.dropped == 600


def test_writes_are_whole_lines_of_at_most_64k_each(tmp_path, reactor):
    access_log = RecordingLog(str(tmp_path / "access.log"), "squid", reactor)
    access_log.disk.clear()
    for i in range(2000):
        access_log.log(entry(url=f"http://example.com/{i:0100d}"))
    access_log.disk.set()
    reactor.run_until(access_log.close())
    assert len(access_log.chunks) > 1
    for chunk in access_log.chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 64 * 1024
    assert len(lines(tmp_path / "access.log")) == 2000


def test_reopen_after_logrotate_moved_the_file(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor)
    access_log.log(entry(url="http://example.com/before"))
    # Wait until the line is on disk, as it is long before logrotate runs.
    for _ in range(500):
        if path.read_text():
            break
        threading.Event().wait(0.01)
    path.rename(tmp_path / "access.log.1")
    access_log.log(entry(url="http://example.com/moved"))  # still the old file: not reopened
    access_log.reopen()
    access_log.log(entry(url="http://example.com/after"))
    reactor.run_until(access_log.close())
    old = [SQUID_LINE.match(line)["url"] for line in lines(tmp_path / "access.log.1")]
    new = [SQUID_LINE.match(line)["url"] for line in lines(path)]
    assert old[0] == "http://example.com/before"
    assert new[-1] == "http://example.com/after"
    assert sorted(old + new) == sorted(
        f"http://example.com/{name}" for name in ("before", "moved", "after")
    )


def test_a_failed_reopen_keeps_writing_to_the_old_file(tmp_path, reactor):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor)
    path.unlink()
    directory.rmdir()  # the directory is gone: reopening fails
    access_log.reopen()
    access_log.log(entry())
    reactor.run_until(access_log.close())
    assert access_log._fd is not None  # no crash; the line went to the unlinked old file


def test_close_twice_and_log_after_close_are_harmless(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor)
    access_log.log(entry())
    first, second = access_log.close(), access_log.close()
    reactor.run_until(first)
    reactor.run_until(second)
    access_log.log(entry())
    reactor.run_until(access_log.close())
    assert len(lines(path)) == 1
    assert access_log.join(1)


def test_open_access_log_is_none_without_a_path(reactor):
    assert open_access_log(C.AccessLogConfig(), reactor) is None


def test_open_access_log_closes_before_the_reactor_shuts_down(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = open_access_log(C.AccessLogConfig(path=str(path), format="json"), reactor)
    access_log.log(entry())
    ((phase, event, close),) = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    reactor.run_until(close())
    assert json.loads(path.read_text())["url"] == "http://example.com/index.html"


def wait_until(condition, what: str, timeout: float = 5.0) -> None:
    """Poll C{condition} (the writer thread's progress) until it holds, or fail naming C{what}."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_lines_logged_while_the_writer_gathers_go_out_in_one_write(tmp_path, reactor):
    access_log = RecordingLog(str(tmp_path / "access.log"), "squid", reactor, flush_interval=60)
    wait_until(lambda: access_log.writer_state == "idle", "the writer to wait for a line")
    access_log.log(entry(url="http://example.com/0"))
    # The first line wakes the writer, which then waits for more instead of writing it alone.
    wait_until(lambda: access_log.writer_state == "gathering", "the writer to gather lines")
    for i in range(1, 100):
        access_log.log(entry(url=f"http://example.com/{i}"))
    assert access_log.chunks == []
    reactor.run_until(access_log.close())  # close() ends the gathering at once
    [chunk] = access_log.chunks
    assert [SQUID_LINE.match(line)["url"] for line in chunk.decode().splitlines()] == [
        f"http://example.com/{i}" for i in range(100)
    ]


def test_a_line_reaches_the_file_within_the_flush_interval_without_a_close(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor, flush_interval=0.01)
    access_log.log(entry())
    wait_until(lambda: len(lines(path)) == 1, "the line in the file")
    access_log.log(entry())  # and again, once the writer went idle
    wait_until(lambda: len(lines(path)) == 2, "the second line in the file")
    reactor.run_until(access_log.close())


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor, flush_interval=60, batch_lines=10)
    for _ in range(10):
        access_log.log(entry())
    wait_until(lambda: len(lines(path)) == 10, "a batch of 10 lines in the file")
    reactor.run_until(access_log.close())


# --- with the relay -----------------------------------------------------------------------

ORIGIN = ("203.0.113.2", 80)


def proxy_factory(access_log, mode: str = "tproxy") -> ProxyFactory:
    listen = "[::]:3129" if mode == "tproxy" else "0.0.0.0:3128"
    config = C.loads(f'[[port]]\nname = "p-{mode}"\nlisten = "{listen}"\nmode = "{mode}"\n')
    clock = Clock()
    clock.advance(1700000000.5)
    return ProxyFactory(
        config.ports[0],
        settings=RelaySettings(timeouts=config.timeouts, limits=config.limits, pseudonym="r"),
        connect=FakeConnect(),
        clock=clock,
        local_addresses=frozenset({"198.51.100.1"}),
        metrics=PortMetrics(f"p-{mode}", mode),
        access_log=access_log,
    )


def connection(factory: ProxyFactory, destination=ORIGIN):
    protocol = factory.buildProtocol(None)
    transport = FakeTransport(
        host=tcp_address(*destination), peer=tcp_address("198.51.100.2", 40001)
    )
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_relay_logs_one_squid_line_per_request_including_its_own_answers(tmp_path, reactor):
    path = tmp_path / "access.log"
    access_log = FileAccessLog(str(path), "squid", reactor)
    factory = proxy_factory(access_log)

    relayed, _ = connection(factory)
    relayed.dataReceived(b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    factory.connect.last.succeed()
    factory.connect.last.protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    )
    malformed, _ = connection(factory)
    malformed.dataReceived(b"NOT HTTP\r\n\r\n")
    direct, _ = connection(factory, destination=("198.51.100.1", 3129))
    direct.dataReceived(b"GET / HTTP/1.1\r\nHost: router\r\n\r\n")

    reactor.run_until(access_log.close())
    written = [SQUID_LINE.match(line) for line in lines(path)]
    assert all(written) and len(written) == 3, lines(path)
    ok, bad, loop = written
    assert (ok["result"], ok["status"], ok["method"], ok["url"]) == (
        "TCP_MISS", "200", "GET", "http://example.com/a"
    )  # fmt: skip
    assert (ok["hierarchy"], ok["server"], ok["type"]) == (
        "HIER_DIRECT",
        "203.0.113.2",
        "text/plain",
    )
    assert (bad["result"], bad["status"], bad["server"]) == ("NONE", "400", "-")
    assert (loop["result"], loop["status"], loop["server"]) == ("TCP_DENIED", "403", "-")
    assert {m["client"] for m in written} == {"198.51.100.2"}
    assert {m["time"] for m in written} == {"1700000000.500"}


@given(st.text(max_size=40))
def test_field_encoding_checks_in_c_what_the_character_loop_would_encode(text):
    from tproxy_twist.accesslog import _field, _last_field

    token = "".join(c if 33 <= ord(c) <= 126 and c != "%" else f"%{ord(c):02X}" for c in text)
    spaced = "".join(c if 32 <= ord(c) <= 126 and c != "%" else f"%{ord(c):02X}" for c in text)
    assert _field(text) == (token or "-")
    assert _last_field(text) == (spaced or "-")
