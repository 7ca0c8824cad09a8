"""
The status page's parts without sockets: the recent problems taken from the
real relay on fake transports, the history's rates, the JSON document, the
HTML page, the resources and status_allow, and what the supervisor and the
worker's link add for it.
"""

from __future__ import annotations

import json
import os

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet import error as neterror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from tproxy_twist import config as C
from tproxy_twist.http.relay import ProxyFactory, RelaySettings
from tproxy_twist.metrics import PortMetrics
from tproxy_twist.status import document, page
from tproxy_twist.status.history import History, PortTotals, response_class, totals_from_samples
from tproxy_twist.status.problems import (
    RECENT,
    Problem,
    ProblemLog,
    decode,
    encode,
    watch_factory,
    where,
)
from tproxy_twist.status.web import StatusResource
from tproxy_twist.testing import FakeConnect, FakeNames, FakeTransport, tcp_address
from tproxy_twist.worker import MasterLink

CLIENT = ("198.51.100.2", 40001)
ROUTER = ("198.51.100.1", 3128)
ROUTER_ADDRESSES = frozenset({"198.51.100.1", "203.0.113.1"})
_ports = iter(range(10**6))


# --- recent problems, from the real relay ---------------------------------------------------


class Port:
    """A forward port's factory, watched, with a fake upstream and clock."""

    def __init__(self, access_log=None) -> None:
        self.name = f"status{next(_ports)}"
        config = C.loads(f'[[port]]\nname = "{self.name}"\nlisten = "0.0.0.0:3128"\n'
                         'mode = "forward"\nallow = ["198.51.100.0/24"]\n')  # fmt: skip
        self.clock = Clock()
        # Forward ports resolve names before connecting (and check the address).
        self.clock.nameResolver = FakeNames({"example.com": ["203.0.113.2"]})
        self.connect = FakeConnect()
        self.factory = ProxyFactory(
            config.ports[0],
            settings=RelaySettings(
                timeouts=config.timeouts, limits=config.limits, pseudonym="router"
            ),
            connect=self.connect,
            clock=self.clock,
            local_addresses=ROUTER_ADDRESSES,
            metrics=PortMetrics(self.name, "forward"),
            access_log=access_log,
        )
        self.problems: list[Problem] = []
        watch_factory(self.factory, self.name, self.clock, self.problems.append)

    def connection(self):
        protocol = self.factory.buildProtocol(None)
        transport = FakeTransport(host=tcp_address(*ROUTER), peer=tcp_address(*CLIENT))
        protocol.makeConnection(transport)
        return protocol, transport


class Entries:
    def __init__(self) -> None:
        self.entries = []

    def log(self, entry) -> None:
        self.entries.append(entry)


def test_a_refused_upstream_is_a_problem_with_client_destination_and_no_query():
    port = Port()
    protocol, transport = port.connection()
    protocol.dataReceived(
        b"GET http://example.com:81/private?token=secret HTTP/1.1\r\nHost: example.com:81\r\n\r\n"
    )
    port.connect.last.fail(neterror.ConnectionRefusedError())
    assert transport.take().startswith(b"HTTP/1.1 502")
    [problem] = port.problems
    assert (problem.port, problem.kind, problem.reason) == (port.name, "upstream_error", "refused")
    assert (problem.client, problem.destination, problem.method, problem.status) == (
        "198.51.100.2", "example.com:81", "GET", 502,
    )  # fmt: skip
    text = encode(problem)
    assert "secret" not in text and "private" not in text
    assert port.factory.access_log is None  # as it was: requests without problems pay nothing


def test_credentials_in_a_target_never_reach_the_problem():
    port = Port()
    protocol, transport = port.connection()
    protocol.dataReceived(b"GET http://user:hunter2@example.com/?k=v HTTP/1.1\r\n"
                          b"Host: example.com\r\n\r\n")  # fmt: skip
    assert transport.take().startswith(b"HTTP/1.1 400")
    [problem] = port.problems
    assert (problem.reason, problem.destination) == ("bad_request", "example.com")
    assert "hunter2" not in encode(problem) and "k=v" not in encode(problem)


def test_a_forbidden_connect_is_a_rejection_and_the_real_access_log_still_gets_its_entry():
    entries = Entries()
    port = Port(entries)
    protocol, transport = port.connection()
    protocol.dataReceived(b"CONNECT example.com:22 HTTP/1.1\r\nHost: example.com:22\r\n\r\n")
    assert transport.take().startswith(b"HTTP/1.1 403")
    [problem] = port.problems
    assert (problem.kind, problem.reason, problem.destination) == (
        "rejected", "forbidden", "example.com:22",
    )  # fmt: skip
    assert [e.status for e in entries.entries] == [403]
    assert port.factory.access_log is entries


def test_a_request_without_a_problem_leaves_the_access_log_and_makes_no_problem():
    entries = Entries()
    port = Port(entries)
    protocol, transport = port.connection()
    protocol.dataReceived(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    port.connect.last.succeed()
    port.connect.last.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert transport.take().startswith(b"HTTP/1.1 200")
    assert port.problems == [] and len(entries.entries) == 1
    assert port.factory.access_log is entries


def test_a_problem_without_an_entry_is_still_told_at_the_next_reactor_turn():
    port = Port()
    port.factory.metrics.upstream_error("reset")
    port.clock.advance(0)
    [problem] = port.problems
    assert (problem.reason, problem.client, problem.destination) == ("reset", "-", "-")
    assert port.factory.access_log is None


def test_the_watched_metrics_still_count():
    port = Port()
    port.factory.metrics.rejected("limit")
    port.factory.metrics.flush()
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("tproxy_rejected_total", {"port": port.name,
                                                                "reason": "limit"})  # fmt: skip
    assert value == 1


class WatchMachine(RuleBasedStateMachine):
    """Problems and entries in any order: each problem told once, the log always restored."""

    def __init__(self) -> None:
        super().__init__()
        self.port = Port(Entries())
        self.real = self.port.factory.access_log
        self.made = 0

    @rule(reason=st.sampled_from(["refused", "reset", "timeout"]))
    def upstream_error(self, reason):
        self.port.factory.metrics.upstream_error(reason)
        self.made += 1

    @rule(reason=st.sampled_from(["forbidden", "limit", "bad_request"]))
    def rejected(self, reason):
        self.port.factory.metrics.rejected(reason)
        self.made += 1

    @rule(status=st.sampled_from([0, 200, 403, 502]))
    def entry(self, status):
        from tproxy_twist.accesslog import AccessEntry

        log = self.port.factory.access_log
        log.log(AccessEntry(time=1.0, duration=0.0, client="198.51.100.9", port="p",
                            mode="forward", method="GET", url="http://h.example/x?q=1",
                            status=status, bytes_out=0, bytes_in=0, destination=None,
                            result="NONE", content_type="-"))  # fmt: skip

    @rule()
    def next_turn(self):
        self.port.clock.advance(0)

    @invariant()
    def told_at_most_once_and_nothing_secret(self):
        assert len(self.port.problems) <= self.made
        assert all("q=1" not in encode(p) for p in self.port.problems)

    def teardown(self):
        self.port.clock.advance(0)
        assert len(self.port.problems) == self.made
        assert self.port.factory.access_log is self.real


TestWatchMachine = WatchMachine.TestCase
TestWatchMachine.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)


@pytest.mark.parametrize(
    ("url", "destination", "shown"),
    [
        ("http://user:pass@example.com:8080/a/b?token=x", None, "example.com:8080"),
        ("http://example.com/a?b", "203.0.113.2:80", "example.com"),
        ("example.com:443", None, "example.com:443"),
        ("http://[2001:db8::2]:81/x?y", None, "[2001:db8::2]:81"),
        ("-", "203.0.113.2:80", "203.0.113.2:80"),
        ("/just/a/path?q", None, "-"),
        ("http://bad:port:x/", None, "-"),
    ],
)
def test_a_problems_destination_is_host_and_port_only(url, destination, shown):
    assert where(url, destination) == shown


def test_problem_lines_round_trip_stay_short_and_malformed_ones_are_ignored():
    problem = Problem(time=1.5, port="p", kind="rejected", reason="limit", client="x" * 5000,
                      destination="d", method="GET", status=429)  # fmt: skip
    line = encode(Problem.from_json(problem.to_json()))
    assert len(line.encode()) < 4096  # one write on the pipe: all or nothing
    back = decode(line.partition(" ")[2], worker=2)
    assert back.worker == 2 and back.reason == "limit" and back.status == 429
    assert decode("{not json", 1) is None
    assert decode('{"time": 1}', 1) is None


def test_the_problem_log_keeps_the_last_50():
    problems = ProblemLog()
    for i in range(RECENT + 7):
        problems.add(Problem(time=float(i), port="p", kind="rejected", reason="limit"))
    assert [p.time for p in problems.recent()] == [float(i) for i in range(7, RECENT + 7)]
    assert len(problems.take()) == RECENT and problems.take() == []


# --- totals and history ----------------------------------------------------------------------


def test_totals_are_summed_per_port_from_the_samples_and_missing_series_are_zero():
    totals = totals_from_samples(
        [
            ("tproxy_requests_total", {"port": "a", "code": "200", "method": "GET"}, 3.0),
            ("tproxy_requests_total", {"port": "a", "code": "200", "method": "POST"}, 2.0),
            ("tproxy_requests_total", {"port": "a", "code": "502", "method": "GET"}, 1.0),
            ("tproxy_requests_total", {"port": "a", "code": "0", "method": "GET"}, 1.0),
            ("tproxy_bytes_total", {"port": "a", "direction": "in"}, 10.0),
            ("tproxy_bytes_total", {"port": "a", "direction": "out"}, 20.0),
            ("tproxy_connections_active", {"port": "a"}, 4.0),
            ("tproxy_upstream_errors_total", {"port": "a", "reason": "refused"}, 1.0),
            ("tproxy_rejected_total", {"port": "b", "reason": "limit"}, 2.0),
            ("tproxy_tls_rejected_total", {"port": "b", "reason": "denied"}, 5.0),
            ("tproxy_workers", {}, 2.0),
        ]
    )
    a, b = totals["a"], totals["b"]
    assert a.requests == 7 and a.responses["2xx"] == 5 and a.responses["5xx"] == 1
    assert a.responses["none"] == 1
    assert (a.bytes_in, a.bytes_out, a.connections_active) == (10, 20, 4)
    assert a.errors == 1 and a.tls_actions == {} and b.errors == 7


def test_response_classes():
    assert [response_class(c) for c in ("101", "204", "304", "404", "503", "0", "x", "999")] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "none", "none", "none",
    ]  # fmt: skip


def points(history: History, values: list[float], start: float = 100.0) -> None:
    for i, value in enumerate(values):
        history.add(start + i, {"p": PortTotals(requests=value)})


def test_rates_are_over_the_span_asked_or_what_is_kept():
    history = History()
    points(history, [0, 0, 0] + [10 * i for i in range(1, 61)])  # 10/s for the last minute
    assert history.rate("p", "requests", 10) == pytest.approx(10)
    assert history.rate("p", "requests", 60) == pytest.approx(10)
    short = History()
    points(short, [0, 30])
    assert short.rate("p", "requests", 60) == pytest.approx(30)
    assert History().rate("p", "requests", 10) == 0


def test_a_counter_that_went_down_is_no_negative_rate_and_the_window_is_bounded():
    history = History(window=10)
    points(history, [50, 60, 5, 5] + [5] * 20)
    assert min(history.series("p", "requests")) >= 0
    assert len(history.series("p", "requests")) == 10
    assert history.rate("p", "requests", 60) == 0


# --- the document and the page -------------------------------------------------------------


def sample_document(port_name: str = "transparent", problem_client: str = "198.51.100.2") -> dict:
    history = History()
    for i in range(12):
        history.add(
            1000.0 + i,
            {
                port_name: PortTotals(
                    requests=5.0 * i,
                    responses={
                        **dict.fromkeys(("1xx", "3xx", "4xx", "none"), 0.0),
                        "2xx": 4.0 * i,
                        "5xx": 1.0 * i,
                    },  # fmt: skip
                    bytes_in=100.0 * i,
                    bytes_out=1000.0 * i,
                    connections=2.0 * i,
                    connections_active=3.0,
                    upstream_errors={"refused": float(i)},
                    rejected={"limit": 0.0},
                )
            },
        )
    master = document.MasterInfo(
        version="1.2.3", pid=42, started=900.0, config_path="/etc/tproxy.toml",
        config_loaded=950.0, generation=2, workers_wanted=2, workers_ready=1,
        last_reload={"time": 950.0, "result": "ok", "detail": "generation 2 serving"},
        probes=(document.Probe("IPv4 transparent bind", True, "fine"),),
    )  # fmt: skip
    workers = [
        document.WorkerInfo(1, 501, 2, "ready", 990.0, 3, 30_000_000, 0),
        document.WorkerInfo(2, 502, 2, "silent", 1000.0, None, None, 4, "no heartbeat for 3s"),
    ]
    problems = [
        Problem(
            time=1005.0 + i,
            port=port_name,
            kind="upstream_error",
            reason="refused",
            client=problem_client,
            destination="203.0.113.2:81",
            method="GET",
            status=502,
            worker=1,
        )  # fmt: skip
        for i in range(3)
    ]
    return document.build(
        now=1011.0,
        master=master,
        ports=[
            document.PortInfo(port_name, "tproxy", "[::]:3129"),
            document.PortInfo("tls", "tproxy", "[::]:3130", "tls"),
        ],  # fmt: skip
        history=history,
        workers=workers,
        problems=problems,
    )


def test_the_document_has_the_documented_shape_and_numbers():
    doc = sample_document()
    json.dumps(doc)  # JSON-ready
    assert doc["schema"] == 1 and set(doc) == {
        "schema", "time", "sampled", "master", "ports", "workers", "problems",
    }  # fmt: skip
    port, tls = doc["ports"]
    assert port["requests_total"] == 55 and port["connections_active"] == 3
    assert port["requests_per_second"] == {"10s": 5.0, "1m": 5.0}
    assert port["errors_per_second"]["10s"] == 1.0
    assert port["bytes_per_second"] == {"in": 100.0, "out": 1000.0}
    assert port["responses"]["2xx"] == 44 and port["responses"]["5xx"] == 11
    assert port["upstream_errors"] == {"refused": 11} and port["rejected"] == {"limit": 0}
    assert port["tls"] is None and len(port["history"]["requests_per_second"]) == 11
    assert tls["requests_total"] == 0 and tls["tls"] == {"actions": {}, "rejected": {}}
    assert doc["master"]["uptime"] == 111.0 and doc["master"]["last_reload"]["result"] == "ok"
    w1, w2 = doc["workers"]
    assert (w1["uptime"], w1["connections"], w1["rss_bytes"]) == (21.0, 3, 30_000_000)
    assert (w2["state"], w2["restarts"], w2["connections"]) == ("silent", 4, None)
    assert [p["time"] for p in doc["problems"]] == [1007.0, 1006.0, 1005.0]  # newest first


def test_the_page_shows_every_port_and_worker_with_sparklines_and_nothing_external():
    doc = sample_document()
    html = page.render(doc)
    assert 'data-port="transparent"' in html and 'data-port="tls"' in html
    assert 'data-worker="1"' in html and "<td>502</td>" in html
    assert html.count("<polyline") == 2  # the tls port has no samples: empty sparklines
    assert "<script" not in html and "src=" not in html and "http://" not in html
    assert 'http-equiv="refresh"' in html


def test_the_page_escapes_what_it_shows():
    doc = sample_document(port_name='<img onerror="x">', problem_client="<b>&</b>")
    html = page.render(doc)
    assert "<img " not in html and "<b>&</b>" not in html
    assert "&lt;img onerror=&quot;x&quot;&gt;" in html and "&lt;b&gt;&amp;&lt;/b&gt;" in html


def test_a_sparkline_is_scaled_to_its_peak():
    svg = page.sparkline([0.0, 5.0, 10.0], "#000", width=100, height=22)
    assert 'points="0.0,21.0 50.0,11.0 100.0,1.0"' in svg and "peak 10.0/s" in svg
    assert "<polyline" not in page.sparkline([], "#000")


# --- the resources and status_allow --------------------------------------------------------


def render(resource, client) -> tuple[int, bytes, DummyRequest]:
    request = DummyRequest([b""])
    request.client = client
    body = resource.render_GET(request)
    return request.responseCode or 200, body, request


ALLOW = C.loads(
    '[metrics]\nstatus_allow = ["127.0.0.0/8", "2001:db8::/32"]\n'
    '[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n'
).status_allow


def test_status_json_is_served_to_an_allowed_client():
    doc = sample_document()
    resource = StatusResource(lambda: doc, lambda: ALLOW, as_json=True)
    code, body, request = render(resource, IPv4Address("TCP", "127.0.0.1", 5000))
    assert code == 200 and json.loads(body) == doc
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    code, body, _ = render(resource, IPv6Address("TCP", "::ffff:127.0.0.1", 5000))
    assert code == 200


def test_a_client_outside_status_allow_gets_403_with_the_reason_and_no_data():
    built = []
    resource = StatusResource(lambda: built.append(1) or {}, lambda: ALLOW, as_json=False)
    code, body, _ = render(resource, IPv4Address("TCP", "192.0.2.7", 5000))
    assert code == 403 and b"192.0.2.7 is not in [metrics] status_allow" in body
    assert built == []


def test_the_page_is_html_with_a_policy_that_forbids_scripts_and_external_loads():
    doc = sample_document()
    resource = StatusResource(lambda: doc, lambda: ALLOW, as_json=False)
    code, body, request = render(resource, IPv6Address("TCP", "2001:db8::5", 5000))
    assert code == 200 and body.startswith(b"<!DOCTYPE html>")
    [policy] = request.responseHeaders.getRawHeaders(b"content-security-policy")
    assert b"default-src 'none'" in policy


def test_status_allow_defaults_to_everyone_and_a_bad_entry_names_file_and_key():
    config = C.loads('[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n', "t.toml")
    assert {str(n) for n in config.status_allow} == {"0.0.0.0/0", "::/0"}
    with pytest.raises(C.ConfigError, match=r"t\.toml: metrics\.status_allow.*not an IP network"):
        C.loads('[metrics]\nstatus_allow = ["nonsense"]\n[[port]]\nlisten = "[::]:3129"\n'
                'mode = "tproxy"\n', "t.toml")  # fmt: skip


# --- the supervisor and the worker's link --------------------------------------------------


def test_heartbeats_carry_connections_and_problem_lines_reach_the_board(tmp_path):
    from test_master import make, ready

    supervisor, _ = make(tmp_path, workers=2)
    told = []
    supervisor.on_problem = told.append
    worker = supervisor.current[2]
    ready(worker)
    worker.childDataReceived(3, b"alive 7\n")
    assert worker.connections == 7
    line = encode(Problem(time=1.0, port="p", kind="rejected", reason="limit")) + "\n"
    worker.childDataReceived(3, line.encode() + b"problem {broken\n")
    assert [(p.worker, p.reason) for p in told] == [(2, "limit")]


def test_restarts_are_counted_per_worker_and_reload_outcomes_are_kept(tmp_path):
    from test_master import exit_, make, ready

    supervisor, reactor = make(tmp_path, workers=2)
    for worker in supervisor.current.values():
        ready(worker)
    reactor.advance(10)
    exit_(supervisor.current[1])
    reactor.advance(0)
    assert supervisor.restarts == {1: 1}
    supervisor.reload(supervisor.config)
    assert supervisor.last_reload["result"] == "started"
    for worker in supervisor.pending.values():
        ready(worker)
    assert supervisor.last_reload["result"] == "ok"
    assert "generation 2" in supervisor.last_reload["detail"]
    supervisor.reload(supervisor.config)
    exit_(supervisor.pending[1])
    assert supervisor.last_reload["result"] == "failed"


def test_the_link_tells_the_problems_then_alive_with_the_open_connections():
    reactor = MemoryReactorClock()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    problems = ProblemLog()
    link = MasterLink(write_end, reactor, lambda: None, interval=1.0,
                      connections=lambda: 3, problems=problems)  # fmt: skip
    link.startService()
    problems.add(Problem(time=1.0, port="p", kind="rejected", reason="limit"))
    reactor.advance(1)
    lines = os.read(read_end, 65536).decode().splitlines()
    assert lines[0] == "alive 3" and lines[2] == "alive 3"
    assert lines[1].startswith("problem ") and decode(lines[1][8:], 1).reason == "limit"
    link.stopService()
    os.close(read_end), os.close(write_end)


def test_a_problem_is_a_frozen_value():
    problem = Problem(time=1.0, port="p", kind="rejected", reason="limit")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        problem.reason = "x"


# --- the session relay's record sink (main's http/record.py shape) -------------------------


class FakeRecord:
    """An exchange record as the session relay hands it to the factory's sink."""

    def __init__(self, **fields) -> None:
        self.finished = 12.5
        self.client = "198.51.100.2"
        self.method = b"GET"
        self.destination = ("203.0.113.2", 81)
        self.status = 502
        self.rejected = None
        self.upstream_error = None
        self.target_url = b"http://example.com:81/private?token=secret"
        self.__dict__.update(fields)

    def url(self) -> bytes:
        return self.target_url


class RecordFactory:
    """A factory with a record sink that, like the relay's, is rebuilt when its metrics are set."""

    def __init__(self) -> None:
        self.records = []
        self.counted = []
        self._metrics = Counting(self.counted)
        self.sink = self._sink_for(self._metrics)

    def _sink_for(self, metrics):
        def sink(record):
            self.records.append(record)
            if record.rejected is not None:
                metrics.rejected(record.rejected)
            if record.upstream_error is not None:
                metrics.upstream_error(record.upstream_error)

        return sink

    @property
    def metrics(self):
        return self._metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        self._metrics = metrics
        self.sink = self._sink_for(metrics)


class Counting:
    def __init__(self, counted: list) -> None:
        self.counted = counted
        self.connections = "the connections child"

    def rejected(self, reason: str) -> None:
        self.counted.append(("rejected", reason))

    def upstream_error(self, reason: str) -> None:
        self.counted.append(("upstream_error", reason))


def watched_records() -> tuple[RecordFactory, list[Problem], Clock]:
    factory, told, clock = RecordFactory(), [], Clock()
    watch_factory(factory, "fwd", clock, told.append)
    return factory, told, clock


def test_a_record_with_an_upstream_error_is_told_with_client_and_host_only():
    factory, told, _ = watched_records()
    factory.sink(FakeRecord(upstream_error="refused"))
    [problem] = told
    assert problem == Problem(time=12.5, port="fwd", kind="upstream_error", reason="refused",
                              client="198.51.100.2", destination="example.com:81",
                              method="GET", status=502)  # fmt: skip
    assert factory.counted == [("upstream_error", "refused")]  # still counted, once
    assert len(factory.records) == 1


def test_a_record_without_a_problem_tells_nothing_and_the_metrics_keep_their_children():
    factory, told, _ = watched_records()
    factory.sink(FakeRecord(status=200))
    assert told == [] and len(factory.records) == 1
    assert factory.metrics.connections == "the connections child"


def test_a_rejection_outside_any_record_is_told_at_once_without_a_client():
    factory, told, clock = watched_records()
    clock.advance(3)
    factory.metrics.rejected("limit")  # a connection turned away before any exchange
    [problem] = told
    assert (problem.time, problem.kind, problem.reason, problem.client) == (
        3.0, "rejected", "limit", "-",
    )  # fmt: skip


def test_a_refused_request_to_an_address_shows_the_address_when_the_url_has_no_host():
    factory, told, _ = watched_records()
    factory.sink(FakeRecord(rejected="forbidden", status=403, target_url=b"-",
                            destination=("2001:db8::2", 22)))  # fmt: skip
    assert told[0].destination == "[2001:db8::2]:22"
