"""
bench/latency.py's analysis (which worker events the slow requests sat in)
and its worker probe (bench/latency_probe), without namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.latency import attribute, intervals, overlap, percentile, worker_stats

ROOT = Path(__file__).resolve().parents[2]


def test_overlap_counts_only_the_part_of_each_event_inside_the_request():
    spans = [(0.5, 1.5), (2.0, 3.0), (9.0, 12.0), (20.0, 21.0)]
    starts = [s for s, _ in spans]
    assert overlap(1.0, 10.0, spans, starts) == 0.5 + 1.0 + 1.0
    assert overlap(13.0, 19.0, spans, starts) == 0.0


def test_overlap_never_exceeds_the_request_when_events_overlap_each_other():
    spans = [(0.0, 10.0), (1.0, 9.0)]  # one event inside another (two workers, or gc in a poll)
    assert overlap(2.0, 4.0, spans, [s for s, _ in spans]) == 2.0


def _probe(gc=(), polls=(), loops=()) -> dict:
    return {
        "gc": [v for event in gc for v in event],
        "polls": [v for event in polls for v in event],
        "timed": [],
        "loops": [v for event in loops for v in event],
        "loop_names": {"0": "ProxyFactory.sweep"},
        "gc_objects": 1,
        "gc_frozen": 0,
    }


def test_a_collection_under_the_slowest_requests_is_blamed_for_their_time_only():
    # 100 requests of 1 ms, one per 10 ms; the last one took 30 ms, during a
    # generation-2 collection; a sweep ran under a fast request.
    sent = [i * 0.01 for i in range(100)]
    latency = [0.001] * 99 + [0.030]
    probe = _probe(
        gc=[(0.995, 1.020, 2, 0)], polls=[(0.0, 0.0005, 1, 0.01, 0.0004)], loops=[(0.5, 0.5002, 0)]
    )
    out = attribute(sent, latency, [probe])
    gen2 = out["gc, generation 2"]
    assert gen2["events"] == 1
    assert gen2["p99_in_flight_share"] == 1.0
    assert 0.8 < gen2["p99_time_share"] <= 1.0
    assert gen2["all_in_flight_share"] == 0.01
    sweep = out["LoopingCall (sweep + metrics flush, heartbeat)"]
    assert sweep["all_in_flight_share"] == 0.01 and sweep["p99_in_flight_share"] == 0.0
    assert out["reactor iteration >= 1 ms"]["events"] == 0


def test_worker_stats_split_collections_by_generation_and_iterations_into_cpu_and_waiting():
    probe = _probe(
        gc=[(0.0, 0.001, 0, 0), (1.0, 1.020, 2, 5)],
        polls=[(0.0, 0.004, 3, 0.25, 0.001)],
        loops=[(0.5, 0.5001, 0)],
    )
    stats = worker_stats(probe)
    assert stats["gc"]["gen2"]["n"] == 1 and round(stats["gc"]["gen2"]["max_ms"]) == 20
    assert stats["gc"]["gen1"] == {"n": 0}
    assert round(stats["iteration_handling_off_cpu"]["max_ms"]) == 3
    assert list(stats["looping_calls"]) == ["ProxyFactory.sweep"]
    assert intervals(probe, "gc", generation=2) == [(1.0, 1.020)]
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


# A worker-like process under the probe: the worker's reactor, five runs of a
# LoopingCall, a collection in the third, then exit (the probe dumps at exit).
_UNDER_PROBE = """
import gc, sys
sys.argv[0] = "tproxy_twist/worker.py"  # the probe dumps for workers only
from tproxy_twist.reactor import install
reactor = install()
from twisted.internet import task
runs = []
def tick():
    runs.append(1)
    if len(runs) == 3:
        gc.collect()
    if len(runs) == 5:
        reactor.stop()
loop = task.LoopingCall(tick)
loop.clock = reactor
loop.start(0.01)
reactor.run(installSignalHandlers=False)
"""


def test_the_probe_records_a_workers_collections_iterations_and_looping_calls(tmp_path):
    env = {
        "PYTHONPATH": f"{ROOT / 'bench' / 'latency_probe'}:{ROOT}",
        "TPROXY_TWIST_LATENCY_PROBE": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_PROBE], env=env, capture_output=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr.decode()
    [dump] = tmp_path.glob("worker-*.json")
    probe = json.loads(dump.read_text())
    assert intervals(probe, "gc", generation=2)  # the gc.collect()
    assert len(probe["polls"]) // 5 >= 4  # reactor iterations (the first run is in start())
    names = probe["loop_names"]
    assert "tick" in names.values()
    assert len(probe["loops"]) // 3 == 5
