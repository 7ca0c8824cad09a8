"""Batched metrics end up exactly where prometheus_client's own calls would put them."""

import itertools
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tproxy_twist.metrics import LATENCY_BUCKETS, PortMetrics, _PendingHistogram

_names = itertools.count()


def test_a_batched_histogram_equals_one_fed_by_observe():
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", ["port"], buckets=LATENCY_BUCKETS, registry=registry)
    batched = Histogram("batched", "b", ["port"], buckets=LATENCY_BUCKETS, registry=registry)
    pending = _PendingHistogram(batched.labels("p"))
    rng = random.Random(7)
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(200)]  # bounds exactly, too
    values += [rng.uniform(0, 100) for _ in range(2000)]
    for i, value in enumerate(values):
        direct.labels("p").observe(value)
        pending.observe(value)
        if i % 97 == 0:
            pending.flush()
    pending.flush()
    text = generate_latest(registry).decode()
    direct_lines = [
        line[len("direct") :] for line in text.splitlines() if line.startswith("direct")
    ]
    batched_lines = [
        line[len("batched") :] for line in text.splitlines() if line.startswith("batched")
    ]
    # Bucket counts and the count are exact; the sum differs only by the
    # order floating point additions were made in.
    exact = [line for line in direct_lines if "_sum" not in line and "_created" not in line]
    assert exact == [line for line in batched_lines if line in exact]
    assert len(exact) == len(LATENCY_BUCKETS) + 2  # every bucket, +Inf and _count
    [direct_sum] = [float(line.split()[-1]) for line in direct_lines if "_sum" in line]
    [batched_sum] = [float(line.split()[-1]) for line in batched_lines if "_sum" in line]
    assert abs(direct_sum - batched_sum) < 1e-6 * direct_sum


def test_port_metrics_count_exactly_after_a_flush():
    from prometheus_client import REGISTRY

    name = f"m{next(_names)}"
    metrics = PortMetrics(name, "tproxy")
    for _ in range(37):
        metrics.request(b"GET", 200, 0.01)
    metrics.request(b"BREW", 418, 0.2)
    metrics.transferred(100, 2000)

    def value(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"port": name, **labels}) or 0

    labels = {"mode": "tproxy", "method": "GET", "code": "200"}
    assert value("tproxy_requests_total", **labels) == 0  # not flushed yet
    metrics.flush()
    assert value("tproxy_requests_total", **labels) == 37
    assert value("tproxy_requests_total", mode="tproxy", method="other", code="418") == 1
    assert value("tproxy_request_duration_seconds_count") == 38
    assert value("tproxy_bytes_total", direction="out") == 2000
    metrics.flush()  # nothing new: nothing changes
    assert value("tproxy_requests_total", **labels) == 37


def test_one_exchange_call_counts_what_request_and_transferred_count():
    registry = CollectorRegistry()
    split = PortMetrics("split", "tproxy", registry)
    joined = PortMetrics("joined", "tproxy", registry)
    rng = random.Random(11)
    for _ in range(300):
        method = rng.choice([b"GET", b"POST", b"BREW"])
        code = rng.choice([200, 404, 502])
        duration = rng.uniform(0, 3)
        bytes_in, bytes_out = rng.randrange(5000), rng.randrange(50000)
        split.request(method, code, duration)
        split.transferred(bytes_in, bytes_out)
        joined.exchange(method, code, duration, bytes_in, bytes_out)
    split.flush()
    joined.flush()
    lines = generate_latest(registry).decode().splitlines()
    samples = [line for line in lines if not line.startswith("#") and "_created" not in line]
    of_split = sorted(line.replace('"split"', "P") for line in samples if '"split"' in line)
    of_joined = sorted(line.replace('"joined"', "P") for line in samples if '"joined"' in line)
    assert of_split == of_joined
    assert any("tproxy_requests_total" in line for line in of_joined)


def test_upstream_connect_durations_and_streams_are_written_at_the_flush_not_per_connection():
    from prometheus_client import REGISTRY

    from tproxy_twist.metrics import StreamMetrics

    name = f"m{next(_names)}"
    metrics = PortMetrics(name, "tproxy")
    streams = StreamMetrics(name)
    for seconds in (0.001, 0.02, 0.3):
        metrics.connect_duration.observe(seconds)
    for how in ("splice", "splice", "copy"):
        streams.started(how)

    def value(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"port": name, **labels})

    connect = "tproxy_upstream_connect_duration_seconds"
    # Every series exists (at 0) before the first flush, and nothing was written per event.
    assert value(connect + "_count") == 0
    assert value("tproxy_streams_total", how="splice") == 0
    metrics.flush()
    streams.flush()
    assert value(connect + "_count") == 3
    assert abs(value(connect + "_sum") - 0.321) < 1e-9
    assert value(connect + "_bucket", le="0.025") == 2
    assert value("tproxy_streams_total", how="splice") == 2
    assert value("tproxy_streams_total", how="copy") == 1
    metrics.flush()
    streams.flush()  # nothing new: nothing changes
    assert value(connect + "_count") == 3
    assert value("tproxy_streams_total", how="splice") == 2
