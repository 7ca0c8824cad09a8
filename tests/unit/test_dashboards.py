"""
The Grafana dashboard and the Prometheus alert rules in grafana/, checked
against the metrics tproxy_twist.metrics defines (no Grafana or Prometheus
needed; tests/e2e/test_prometheus.py runs them against a real Prometheus).

The exported metric names are derived from the collectors in
tproxy_twist.metrics: prometheus_client names the samples of each described
metric family (counter ``_total``, histogram ``_bucket``/``_sum``/``_count``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
)

from tproxy_twist import metrics

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tproxy-twist.json"
RULES = GRAFANA / "alerts" / "tproxy-twist.rules.yml"
RULES_TEST = GRAFANA / "alerts" / "tproxy-twist.rules.test.yml"

# Series Prometheus itself adds to every scrape that the rules may use.
PROMETHEUS_SERIES = frozenset({"up"})

# Alerts issue 4 asks for.
REQUIRED_ALERTS = {"ProxyDown", "HighErrorRatio", "SpoofingFailures", "WorkerRestartStorm",
                   "HighLatency"}  # fmt: skip


# -- what the project exports ---------------------------------------------------


def project_collectors() -> list[MetricWrapperBase]:
    return [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]


def _example_family(described: Metric) -> Metric:
    """A family of ``described``'s type with one sample set, named by prometheus_client."""
    name, doc = described.name, described.documentation
    make = {
        "counter": lambda: CounterMetricFamily(name, doc, value=0),
        "gauge": lambda: GaugeMetricFamily(name, doc, value=0),
        "histogram": lambda: HistogramMetricFamily(name, doc, buckets=[("+Inf", 0)], sum_value=0),
        "summary": lambda: SummaryMetricFamily(name, doc, count_value=0, sum_value=0),
        "info": lambda: InfoMetricFamily(name, doc, value={}),
        "stateset": lambda: StateSetMetricFamily(name, doc, value={"a": True}),
    }.get(described.type)
    if make is None:
        raise AssertionError(f"{name}: metric type {described.type!r} not handled by this test")
    return make()


@cache
def exported_families() -> dict[str, frozenset[str]]:
    """Family name -> the sample names prometheus_client exports for it."""
    families = {}
    for collector in project_collectors():
        for described in collector.describe():
            samples = frozenset(s.name for s in _example_family(described).samples)
            families[described.name] = samples
    return families


def exported_names() -> frozenset[str]:
    return frozenset().union(*exported_families().values())


# -- PromQL: the metric names an expression selects -----------------------------

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<variable>\$\{?\w+(?::\w+)?\}?)        # Grafana: $port, ${port}, $__rate_interval
    | (?P<number>\d[\w.]*|\.\d[\w.]*)           # 0.95, 1e3, 0x1f, durations: 5m, 1h30m
    | (?P<ident>[A-Za-z_:][\w:]*)
    | (?P<space>\s+)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                           "count_values", "bottomk", "topk", "quantile", "limitk",
                           "limit_ratio"})  # fmt: skip
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"bool", "offset", "and", "or", "unless", "atan2",
                                         "inf", "nan", "start", "end"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects.

    Skipped: strings, Grafana variables, numbers and durations, label names
    in ``{…}``, label lists after by/without/on/ignoring/group_left/group_right,
    function and aggregation names, and keywords.
    """
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "string", "variable", "number")
    ]
    names: set[str] = set()
    braces = brackets = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif text == "[":
            brackets += 1
        elif text == "]":
            brackets -= 1
        elif kind == "ident" and not braces and not brackets:
            if text.lower() in _GROUPING and following == "(":
                i = _closing(tokens, i + 1)
            elif following != "(" and text.lower() not in _KEYWORDS:
                names.add(text)
        i += 1
    return names


def without_strings(expr: str) -> str:
    """``expr`` with every string literal emptied (regexes in strings contain brackets)."""
    return "".join('""' if m.lastgroup == "string" else m.group() for m in _TOKEN.finditer(expr))


def _closing(tokens: list[tuple[str | None, str]], open_index: int) -> int:
    """The index of the ``)`` matching the ``(`` at ``open_index``."""
    depth = 0
    for j in range(open_index, len(tokens)):
        if tokens[j][1] == "(":
            depth += 1
        elif tokens[j][1] == ")":
            depth -= 1
            if depth == 0:
                return j
    raise AssertionError(f"unbalanced parentheses in {' '.join(t for _, t in tokens)!r}")


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.+),\s*)?(?P<label>\w+)\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$")


def variable_expression(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query, if any."""
    for pattern in (_LABEL_VALUES, _QUERY_RESULT):
        match = pattern.match(query)
        if match:
            return match.group("expr")
    if query.startswith(("label_names(", "metrics(")):
        return None
    return query


# -- the dashboard -----------------------------------------------------------------


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> Iterator[dict]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def variables() -> dict[str, dict]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def variable_queries() -> list[tuple[str, str]]:
    found = []
    for name, var in variables().items():
        if var["type"] != "query":
            continue
        query = var["query"]
        if isinstance(query, dict):  # newer Grafana stores {"query": "...", ...}
            query = query["query"]
        expr = variable_expression(query)
        if expr is not None:
            found.append((f"${name}", expr))
    return found


# -- the rules -----------------------------------------------------------------------

_BLOCK_SCALAR = re.compile(r"^[|>][-+]?$")


def rule_expressions(text: str) -> list[tuple[str, str]]:
    """(alert or record name, expr) for every rule in a Prometheus rules file.

    A small reader for the subset of YAML the rules file uses (plain, quoted
    and block scalars), so the tests need no YAML library.
    """
    found = []
    name = "?"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        rule = re.match(r"^\s*-\s*(?:alert|record):\s*(\S+)", line)
        if rule:
            name = rule.group(1)
            continue
        key = re.match(r"^(\s*)expr:\s*(.*?)\s*$", line)
        if not key:
            continue
        indent, value = len(key.group(1)), key.group(2)
        if _BLOCK_SCALAR.match(value):
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = " ".join(part for part in block if part)
        elif value[:1] in ("'", '"') and value[-1:] == value[:1]:
            value = value[1:-1]
        found.append((name, value))
    return found


def alert_blocks(text: str) -> dict[str, str]:
    """Alert name -> the text of its rule entry."""
    blocks = re.split(r"^\s*-\s*alert:\s*", text, flags=re.MULTILINE)[1:]
    return {block.split(None, 1)[0]: block for block in blocks}


# -- tests: the helpers themselves ------------------------------------------------------


def test_exported_names_agree_with_what_the_live_registry_exports():
    """The derivation names samples as prometheus_client does for our real collectors."""
    names = exported_names()
    for collector in project_collectors():
        for family in collector.collect():
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    assert sample.name in names, sample.name


def test_counters_are_exported_with_total_and_histograms_with_buckets():
    for collector in project_collectors():
        for described in collector.describe():
            samples = exported_families()[described.name]
            if described.type == "counter":
                assert samples == {described.name + "_total"}
            if described.type == "histogram":
                assert {described.name + s for s in ("_bucket", "_sum", "_count")} == samples


@pytest.mark.parametrize(
    "expr, names",
    [
        ('sum by (port, le) (rate(a_bucket{port=~"$port", le!="x"}[$__rate_interval]))',
         {"a_bucket"}),
        ('label_replace(rate(a_total[5m]), "class", "${1}xx", "code", "(.)..")', {"a_total"}),
        ("histogram_quantile(0.95, sum(rate(h_bucket[1h30m])) without (instance))", {"h_bucket"}),
        ("x / on (port) group_left (mode) y > bool 1e3", {"x", "y"}),
        ("up == 0 or absent(up{job='t'}) unless z offset 5m", {"up", "z"}),
        ("sum(a) / ignoring(code) count(b) and topk(3, c) - Inf + NaN", {"a", "b", "c"}),
        ('{__name__=~"x"}', set()),
    ],
)  # fmt: skip
def test_promql_metric_names_skip_functions_labels_keywords_and_durations(expr, names):
    assert promql_metric_names(expr) == names


def test_rule_reader_finds_plain_quoted_and_block_expressions():
    text = (
        "groups:\n  - name: g\n    rules:\n"
        "      - alert: A\n        expr: up == 0\n        for: 1m\n"
        "      - alert: B\n        expr: 'x > 1'\n"
        "      - record: c:rate\n        expr: |\n          sum(\n            rate(y[5m]))\n"
        "        labels:\n          a: b\n"
    )
    assert rule_expressions(text) == [
        ("A", "up == 0"),
        ("B", "x > 1"),
        ("c:rate", "sum( rate(y[5m]))"),
    ]


# -- tests: the dashboard -------------------------------------------------------------


def test_dashboard_is_a_current_grafana_dashboard():
    board = dashboard()
    assert board["schemaVersion"] >= 38
    assert board["uid"] and board["title"]
    assert board["id"] is None  # provisioned and imported dashboards get their id from Grafana


def test_panel_ids_are_unique():
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_and_query_uses_the_datasource_variable():
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_every_panel_has_a_unit():
    for panel in panels():
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_panels_fit_the_grid_and_do_not_overlap():
    boxes = []
    for panel in panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["y"] >= 0 and pos["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        for title, other in boxes:
            assert not cells & other, f"{panel['title']!r} overlaps {title!r}"
        boxes.append((panel["title"], cells))


def test_template_variables_are_datasource_and_port():
    found = variables()
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    port = found["port"]
    assert port["type"] == "query"
    assert port["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert re.fullmatch(r"label_values\(\s*tproxy_requests_total\s*,\s*port\s*\)", port["query"])
    assert port["multi"] and port["includeAll"]
    assert port["allValue"] == ".*"  # `port=~"$port"` then matches every port


def test_every_rate_and_increase_uses_rate_interval():
    for title, expr in dashboard_expressions():
        for function in re.findall(r"\b(i?rate|increase|delta|\w+_over_time)\s*\(", expr):
            assert function in ("rate", "increase"), f"{title}: {function} in {expr}"
        windows = re.findall(r"\[([^\]]*)\]", without_strings(expr))
        assert all(w == "$__rate_interval" for w in windows), f"{title}: {expr}"
        if re.search(r"\b(rate|increase)\s*\(", expr):
            assert windows, f"{title}: {expr}"


def unlabelled_names() -> set[str]:
    """
    Sample names of the metrics without a C{port} label: those without labels
    (they always have their one sample) and worker-wide ones such as the TLS
    leaf cache's (C{result} only).
    """
    names = {
        sample.name
        for collector in project_collectors()
        for family in collector.collect()
        for sample in family.samples
        if not set(sample.labels) - {"le"}
    }
    for collector in project_collectors():
        if "port" not in collector._labelnames:  # prometheus_client keeps them here
            for described in collector.describe():
                names |= exported_families()[described.name]
    return names


def test_port_labelled_queries_filter_by_the_port_variable():
    """Every selector of a metric with a `port` label honours $port."""
    unlabelled = unlabelled_names()
    for title, expr in dashboard_expressions():
        for name in promql_metric_names(expr) - unlabelled:
            for selector in re.findall(rf"\b{name}\b(\{{[^}}]*\}})?", expr):
                assert 'port=~"$port"' in selector, f"{title}: {name} without $port in {expr}"


def test_dashboard_and_variables_reference_only_exported_metrics():
    exported = exported_names()
    for where, expr in dashboard_expressions() + variable_queries():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported ({expr})"


def test_every_exported_metric_has_a_panel():
    used = set().union(*(promql_metric_names(e) for _, e in dashboard_expressions()))
    for family, samples in exported_families().items():
        assert samples & used, f"no panel shows {family}"


# -- tests: the rules --------------------------------------------------------------------


def test_rules_reference_only_exported_metrics_and_up():
    allowed = exported_names() | PROMETHEUS_SERIES
    rules = rule_expressions(RULES.read_text())
    assert len(rules) == len(alert_blocks(RULES.read_text()))
    for name, expr in rules:
        names = promql_metric_names(expr)
        assert names, f"{name}: no metric in {expr!r}"
        assert names <= allowed, f"{name}: {sorted(names - allowed)} not exported ({expr})"


def test_every_alert_has_for_severity_summary_and_description():
    blocks = alert_blocks(RULES.read_text())
    assert REQUIRED_ALERTS <= blocks.keys()
    for name, block in blocks.items():
        assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.MULTILINE), f"{name}: no `for`"
        assert re.search(r"^\s+severity:\s*(critical|warning|info)\s*$", block, re.MULTILINE), (
            f"{name}: no severity label"
        )
        for annotation in ("summary", "description"):
            assert re.search(rf"^\s+{annotation}:\s*\S", block, re.MULTILINE), (
                f"{name}: no {annotation}"
            )


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    text = RULES_TEST.read_text()
    checks = re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*(\[\])?", text)
    for alert in alert_blocks(RULES.read_text()):
        kinds = {"quiet" if empty else "fires" for name, empty in checks if name == alert}
        assert kinds == {"quiet", "fires"}, f"{alert}: unit tests cover only {kinds}"
