"""
The proxy's metrics as Prometheus sees them: promtool on the rules and on our
exposition, exact request counting per port, and a real Prometheus (Debian
package ``prometheus``) scraping the proxy in the router namespace, through
which every dashboard and alert-rule expression is evaluated.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tproxy_twist.lab import Lab
from tproxy_twist.lab.topology import REPO_ROOT

GRAFANA = REPO_ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tproxy-twist.json"
RULES = GRAFANA / "alerts" / "tproxy-twist.rules.yml"
RULES_TEST = GRAFANA / "alerts" / "tproxy-twist.rules.test.yml"
EXAMPLE_CONFIG = GRAFANA / "prometheus.yml"

MISSING = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not installed (apt-get install prometheus)",
)

METRICS_URL = "http://127.0.0.1:9464/metrics"  # in the router namespace
PROMETHEUS = "127.0.0.1:9090"  # in the router namespace: nothing else listens there
REQUIRED_ALERTS = {"ProxyDown", "HighErrorRatio", "SpoofingFailures", "WorkerRestartStorm",
                   "HighLatency"}  # fmt: skip
# What Grafana would put in: every port, and the rate window a 15s scrape interval gives.
ALL_PORTS = ".*"
RATE_INTERVAL = "1m"

CONFIG = """
workers = 2

[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 3
response = 5

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["198.51.100.0/24"]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"

[tls]
ca_cert = "CA_DIR/ca.pem"
ca_key = "CA_DIR/ca.key"

# Nothing is diverted to it here: its TLS and bump series exist (at 0) for the
# TLS panels.
[[port]]
name = "tls"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
[port.tls]
default = "bump"
"""

ORIGIN = f"http://{Lab.ORIGIN4}"  # port 80: diverted to the tproxy port
FORWARD_PROXY = f"http://{Lab.ROUTER_CLIENT4}:3128"


# -- helpers ------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = GRAFANA) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def exposition(lab: Lab) -> str:
    proc = lab.run(lab.router, ["curl", "-s", "--noproxy", "*", METRICS_URL])
    return proc.stdout.decode()


def requests_by_port(lab: Lab) -> Counter[str]:
    """tproxy_requests_total summed over every label but ``port``."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(exposition(lab)):
        for sample in family.samples:
            if sample.name == "tproxy_requests_total":
                counts[sample.labels["port"]] += int(sample.value)
    return counts


def fetch(curl, urls: list[str], *args: str) -> list[str]:
    """GET every URL in one curl run, a new connection each; return the status codes.

    ``Connection: close`` makes every request a new connection, so the kernel
    spreads them over the workers' listeners.
    """
    argv = ["-H", "Connection: close", "-w", "%{http_code}\\n", *args]
    for url in urls:
        argv += [url, "-o", "/dev/null"]
    result = curl(*argv, timeout=120)
    return result.stdout.decode().split()


def forbidden_connect(curl) -> str:
    """CONNECT to port 22 through the forward port (only 443 is allowed): 403."""
    result = curl("-p", "-x", FORWARD_PROXY, "-o", "/dev/null", "-w", "%{http_connect}",
                  f"http://{Lab.ORIGIN4}:22/")  # fmt: skip
    return result.stdout.decode()


def send_traffic(curl, ok: int) -> None:
    """Successes, origin errors, proxy-made errors and rejections on both ports."""
    assert fetch(curl, [f"{ORIGIN}/ip"] * ok) == ["200"] * ok
    assert fetch(curl, [f"{ORIGIN}/status/503", f"{ORIGIN}/status/404"]) == ["503", "404"]
    assert fetch(curl, [f"{ORIGIN}:8080/ip"] * ok, "-x", FORWARD_PROXY) == ["200"] * ok
    # Nobody listens on 81: the proxy answers 502 (upstream_errors{reason="refused"}).
    assert fetch(curl, [f"{ORIGIN}:81/"], "-x", FORWARD_PROXY) == ["502"]
    assert forbidden_connect(curl) == "403"  # rejected{reason="forbidden"}
    # Straight to the tproxy port, not diverted: refused as a loop (rejected{reason="loop"}).
    assert fetch(curl, [f"http://{Lab.ROUTER_CLIENT4}:3129/"]) == ["403"]


def wait_for(condition, what: str, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Runs in the router namespace (where Prometheus listens on loopback): a list of
# [path, params] on stdin, a list of [HTTP status, JSON body or text] on stdout.
_API_CLIENT = """
import json, sys, urllib.error, urllib.parse, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = []
for path, params in json.load(sys.stdin):
    url = "http://" + sys.argv[1] + path + "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with opener.open(url, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        status, body = 0, str(e).encode()
    try:
        out.append([status, json.loads(body)])
    except ValueError:
        out.append([status, body.decode(errors="replace")])
json.dump(out, sys.stdout)
"""


class PrometheusAPI:
    def __init__(self, lab: Lab, address: str) -> None:
        self.lab = lab
        self.address = address

    def get_many(self, requests: list[tuple[str, dict]]) -> list[tuple[int, object]]:
        proc = self.lab.run(
            self.lab.router,
            [sys.executable, "-c", _API_CLIENT, self.address],
            input=json.dumps(requests).encode(),
        )
        return [tuple(item) for item in json.loads(proc.stdout)]

    def get(self, path: str, **params) -> tuple[int, object]:
        return self.get_many([(path, params)])[0]

    def query_many(self, exprs: list[str]) -> list[dict]:
        """Instant queries; each answer is Prometheus's JSON (status, data, error…)."""
        answers = self.get_many([("/api/v1/query", {"query": e}) for e in exprs])
        return [body if isinstance(body, dict) else {"status": "error", "error": body}
                for _, body in answers]  # fmt: skip

    def scalar(self, expr: str) -> float | None:
        answer = self.query_many([expr])[0]
        result = answer.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def config(tmp_path: Path) -> str:
    """CONFIG with a CA for its bump port, made by `tproxy-twist ca init`."""
    ca_dir = tmp_path / "ca"
    subprocess.run(
        [sys.executable, "-m", "tproxy_twist.cli", "ca", "init", "--dir", str(ca_dir)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return CONFIG.replace("CA_DIR", str(ca_dir))


#: Series that only TLS ports have.
TLS_ONLY = re.compile(r"tproxy_tls_")


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel["targets"]]  # fmt: skip


def grafana_substitute(expr: str, port: str) -> str:
    """What Grafana sends: $port as a regex, $__rate_interval as a duration."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$\{port(?::\w+)?\}|\$port\b", port, expr)


def prometheus_config(tmp_path: Path) -> Path:
    """The example grafana/prometheus.yml, with 1s intervals and the rules next to it."""
    text, changed = re.subn(r"\b(scrape|evaluation)_interval: *\S+", r"\1_interval: 1s",
                            EXAMPLE_CONFIG.read_text())  # fmt: skip
    assert changed == 2, "grafana/prometheus.yml: scrape_interval and evaluation_interval"
    (tmp_path / "alerts").mkdir()
    shutil.copy(RULES, tmp_path / "alerts" / RULES.name)
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    return path


def has_data(answer: dict) -> bool:
    """A successful answer with at least one series whose value is a number."""
    result = answer.get("data", {}).get("result", [])
    return any(not math.isnan(float(series["value"][1])) for series in result)


# -- promtool -------------------------------------------------------------------------


def test_promtool_check_rules_is_clean():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "WARNING" not in result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass():
    result = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_example_prometheus_config_is_valid_and_loads_the_rules():
    result = promtool("check", "config", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


# -- the proxy --------------------------------------------------------------------------


def test_37_and_11_requests_move_the_per_port_counters_by_exactly_37_and_11(
    proxy, lab, curl, config
):
    """Exact counting over all workers, including answers the proxy makes itself."""
    proxy(config)
    before = requests_by_port(lab)

    tproxy_codes = fetch(curl, [f"{ORIGIN}/ip"] * 30 + [f"{ORIGIN}/status/503"] * 4
                         + [f"{ORIGIN}/status/404"] * 3)  # fmt: skip
    assert Counter(tproxy_codes) == {"200": 30, "503": 4, "404": 3}
    forward_codes = fetch(
        curl, [f"{ORIGIN}:8080/ip"] * 7 + [f"{ORIGIN}:81/"] * 3, "-x", FORWARD_PROXY
    )
    assert Counter(forward_codes) == {"200": 7, "502": 3}
    assert forbidden_connect(curl) == "403"
    expected = {"transparent": 37, "forward": 11}

    def moved() -> dict[str, int]:
        after = requests_by_port(lab)
        return {port: after[port] - before[port] for port in expected}

    # A request is counted when its exchange ends, which may be a moment after
    # curl has the response; then nothing more may arrive.
    wait_for(lambda: all(moved()[p] >= n for p, n in expected.items()), "the counts", 10)
    time.sleep(0.5)
    assert moved() == expected


def test_promtool_check_metrics_finds_our_exposition_clean(proxy, lab, curl, config):
    proxy(config)
    send_traffic(curl, 3)
    time.sleep(0.5)  # workers hand their counts to /metrics a few times a second
    text = exposition(lab)
    assert "tproxy_requests_total{" in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_prometheus_evaluates_every_dashboard_and_rule_expression_with_data(
    proxy, lab, curl, tmp_path, config
):
    proxy(config)
    # Every series exists before Prometheus first scrapes, so rates over the
    # later traffic are positive (a series' first sample is not an increase).
    send_traffic(curl, 2)

    config = prometheus_config(tmp_path)
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "ab") as log:
        prometheus = lab.popen(
            lab.router,
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={PROMETHEUS}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    api = PrometheusAPI(lab, PROMETHEUS)

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def scraped(total: int) -> bool:
        """Prometheus has a sample with at least ``total`` requests (counting may lag curl)."""
        value = api.scalar('sum(tproxy_requests_total{job="tproxy-twist"})')
        return value is not None and value >= total

    def exposed_total() -> int:
        return sum(requests_by_port(lab).values())

    try:
        wait_for(
            lambda: prometheus.poll() is not None or api.get("/-/ready")[0] == 200,
            "Prometheus to be ready",
        )
        assert prometheus.poll() is None, f"Prometheus exited:\n{log_text()}"
        total = exposed_total()
        wait_for(lambda: scraped(total), "the first scrape")

        send_traffic(curl, 10)
        total = exposed_total()
        wait_for(lambda: scraped(total), "a scrape after the traffic")
        time.sleep(3)  # a few more scrapes and rule evaluations

        # The target is up, in the job the ProxyDown alert watches.
        assert api.scalar('up{job="tproxy-twist"}') == 1.0

        # The $port variable: its values are our port names.
        status, labels = api.get(
            "/api/v1/label/port/values", **{"match[]": "tproxy_requests_total"}
        )
        assert status == 200 and {"forward", "transparent"} <= set(labels["data"]), labels

        # Every dashboard query, for all ports and for one port.
        queries = dashboard_queries()
        for one_port in (ALL_PORTS, "forward"):
            # TLS series exist for TLS ports only: their panels are checked with one.
            ports = [one_port if not TLS_ONLY.search(e) or one_port == ALL_PORTS else "tls"
                     for _, e in queries]  # fmt: skip
            exprs = [
                grafana_substitute(expr, p) for (_, expr), p in zip(queries, ports, strict=True)
            ]
            answers = api.query_many(exprs)
            for (title, _), expr, answer, port in zip(queries, exprs, answers, ports, strict=True):
                assert answer["status"] == "success", f"{title}: {expr}: {answer}"
                assert not answer.get("warnings"), f"{title}: {expr}: {answer}"
                assert has_data(answer), f"{title}: no data for {expr}: {answer}"
                if port != ALL_PORTS:
                    for series in answer["data"]["result"]:
                        assert series["metric"].get("port", port) == port, (
                            f"{title}: $port={port!r} let through {series['metric']}"
                        )

        # Every rule: loaded, evaluated without error, and its expression evaluates.
        status, rules_answer = api.get("/api/v1/rules")
        assert status == 200, rules_answer
        rules = [rule for group in rules_answer["data"]["groups"] for rule in group["rules"]]
        assert REQUIRED_ALERTS <= {rule["name"] for rule in rules}
        for rule, answer in zip(rules, api.query_many([r["query"] for r in rules]), strict=True):
            assert answer["status"] == "success", f"{rule['name']}: {answer}"
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            assert rule["duration"] > 0, f"{rule['name']}: no `for`"
            assert rule["labels"].get("severity") in ("critical", "warning"), rule
            assert {"summary", "description"} <= rule["annotations"].keys(), rule
        states = {rule["name"]: rule["state"] for rule in rules}
        assert states["ProxyDown"] == "inactive", states
        assert states["SpoofingFailures"] == "inactive", states
        print(
            f"evaluated {2 * len(queries)} dashboard queries ({len(queries)} x 2 port values), "
            f"1 variable query and {len(rules)} rule expressions"
        )
    finally:
        lab.stop_process(prometheus, grace=5)
    assert "level=error" not in log_text(), log_text()
