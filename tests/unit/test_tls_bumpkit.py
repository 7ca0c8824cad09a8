"""
The [tls] configuration table, the worker's bump loader (errors name the
configuration file and key), pinned-host counting and the bump metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.metrics import BumpMetrics, LeafCacheMetrics
from tproxy_twist.tls.bumpkit import load_bump_kit
from tproxy_twist.tls.ca import create_ca, write_ca
from tproxy_twist.tls.pinning import PinnedHosts
from tproxy_twist.tls.testing import make_ca, now_utc

REPO = Path(__file__).resolve().parents[2]
PORT = '\n[[port]]\nlisten = "127.0.0.1:3128"\nmode = "forward"\n'


def load(tls: str) -> C.Config:
    return C.loads(f"[tls]\n{tls}\n{PORT}", "tproxy.toml")


# --- [tls] ----------------------------------------------------------------------------------


def test_without_a_tls_table_the_defaults_apply():
    tls = C.loads(PORT, "tproxy.toml").tls
    assert tls == C.TLSConfig()
    assert (tls.ca_cert, tls.ca_key) == ("/etc/tproxy-twist/ca.pem", "/etc/tproxy-twist/ca.key")
    assert tls.ca_bundle is None and tls.on_verify_failure == "splice"
    assert tls.leaf_cache_size == 1000 and tls.pinned_splice_after == 0


def test_every_tls_key_is_read():
    tls = load(
        'ca_cert = "/srv/ca.pem"\nca_key = "/srv/ca.key"\nca_bundle = "/srv/roots.pem"\n'
        'leaf_cache_size = 50\non_verify_failure = "terminate"\npinned_splice_after = 3'
    ).tls
    assert tls == C.TLSConfig(
        ca_cert="/srv/ca.pem",
        ca_key="/srv/ca.key",
        ca_bundle="/srv/roots.pem",
        leaf_cache_size=50,
        on_verify_failure="terminate",
        pinned_splice_after=3,
    )


def test_an_empty_ca_bundle_means_the_system_trust_store():
    assert load('ca_bundle = ""').tls.ca_bundle is None


@pytest.mark.parametrize(
    "text, message",
    [
        ('on_verify_failure = "bump"', "tls.on_verify_failure: must be one of splice, terminate"),
        ("leaf_cache_size = 0", "tls.leaf_cache_size: must be from 1 to 1000000"),
        ("pinned_splice_after = -1", "tls.pinned_splice_after: must be from 0"),
        ('ca_key = ""', "tls.ca_key: must name a file"),
        ("ca_cert = 5", "tls.ca_cert: must be a string"),
        ('ca_cert = "/x.pem"\nca_key = "/x.pem"', "tls.ca_key: must be a file of its own"),
        ('ca_kee = "/x.key"', "tls.ca_kee: unknown key"),
    ],
)
def test_tls_mistakes_name_the_file_and_key(text, message):
    with pytest.raises(C.ConfigError, match=f"^tproxy.toml: {message}"):
        load(text)


# --- the worker's loader -------------------------------------------------------------------


def config_with_ca(tmp_path: Path, extra: str = "") -> C.Config:
    key, certificate = create_ca("kit CA", now_utc())
    write_ca(key, certificate, str(tmp_path / "ca.pem"), str(tmp_path / "ca.key"))
    text = f'ca_cert = "{tmp_path}/ca.pem"\nca_key = "{tmp_path}/ca.key"\n{extra}'
    return C.loads(f"[tls]\n{text}\n{PORT}", str(tmp_path / "tproxy.toml"))


def clock_now() -> Clock:
    clock = Clock()
    clock.advance(now_utc().timestamp())
    return clock


def test_the_loader_builds_a_workers_bump_state(tmp_path):
    config = config_with_ca(tmp_path, 'leaf_cache_size = 7\non_verify_failure = "terminate"')
    kit = load_bump_kit(config, clock_now(), metrics=False)
    assert kit.leaves.capacity == 7 and kit.on_verify_failure == "terminate"
    assert kit.server.leaves is kit.leaves
    assert kit.ca.cert_path == str(tmp_path / "ca.pem")
    kit.leaves.get("example.com")
    assert len(kit.leaves) == 1


def test_the_loader_refuses_a_readable_key_naming_the_config_and_key(tmp_path):
    config = config_with_ca(tmp_path)
    os.chmod(tmp_path / "ca.key", 0o640)
    with pytest.raises(C.ConfigError) as error:
        load_bump_kit(config, clock_now(), metrics=False)
    assert str(error.value).startswith(f"{tmp_path}/tproxy.toml: tls.ca_key: {tmp_path}/ca.key:")
    assert "chmod 600" in str(error.value)


def test_the_loader_names_ca_cert_for_a_certificate_problem(tmp_path):
    config = config_with_ca(tmp_path)
    (tmp_path / "ca.pem").write_text("nothing here\n")
    with pytest.raises(C.ConfigError, match=r"tproxy.toml: tls.ca_cert: .*ca.pem: no PEM"):
        load_bump_kit(config, clock_now(), metrics=False)


def test_the_loader_names_ca_bundle_for_an_unreadable_bundle(tmp_path):
    config = config_with_ca(tmp_path, f'ca_bundle = "{tmp_path}/missing.pem"')
    with pytest.raises(C.ConfigError, match=r"tproxy.toml: tls.ca_bundle: .*missing.pem: cannot"):
        load_bump_kit(config, clock_now(), metrics=False)


def test_the_loader_reads_a_trust_bundle(tmp_path):
    (tmp_path / "roots.pem").write_bytes(make_ca("a root").cert_pem)
    config = config_with_ca(tmp_path, f'ca_bundle = "{tmp_path}/roots.pem"')
    kit = load_bump_kit(config, clock_now(), metrics=False)
    assert kit.origins.creator("example.com") is not None


def test_a_worker_without_bump_imports_no_openssl():
    """The worker's memory win: config, metrics and the relay never load OpenSSL."""
    code = (
        "import sys; sys.modules.setdefault('OpenSSL', None)\n"
        # The TLS port's hello reader and rules are pure Python: config uses them.
        "PURE = {'clienthello', 'decide'}\n"
        "import tproxy_twist.worker, tproxy_twist.config, tproxy_twist.metrics\n"
        "import tproxy_twist.http.relay, tproxy_twist.cli\n"
        "tproxy_twist.cli._parser()\n"
        "loaded = [m for m, module in sys.modules.items() if module is not None]\n"
        "bad = [m for m in loaded if m.startswith(('cryptography', 'OpenSSL'))\n"
        "       or m.startswith('tproxy_twist.tls.') and m.split('.')[2] not in PURE]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()


# --- pinned hosts ---------------------------------------------------------------------------


def test_a_host_is_spliced_after_the_configured_number_of_rejections():
    pinned = PinnedHosts(threshold=3)
    assert [pinned.rejected("app.example") for _ in range(4)] == [False, False, True, False]
    assert pinned.should_splice("app.example")
    assert not pinned.should_splice("other.example")


def test_with_threshold_zero_nothing_is_remembered_or_spliced():
    pinned = PinnedHosts(threshold=0)
    assert not any(pinned.rejected("app.example") for _ in range(10))
    assert not pinned.should_splice("app.example") and len(pinned) == 0


def test_pinned_host_memory_is_bounded_forgetting_the_least_recent():
    pinned = PinnedHosts(threshold=1, capacity=2)
    for host in ("a.example", "b.example", "c.example"):
        pinned.rejected(host)
    assert len(pinned) == 2
    assert not pinned.should_splice("a.example")
    assert pinned.should_splice("b.example") and pinned.should_splice("c.example")


# --- metrics --------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_leaf_cache_metrics_count_hits_misses_evictions_and_entries():
    before = {r: sample("tproxy_tls_leaf_cache_total", result=r) for r in ("hit", "miss")}
    metrics = LeafCacheMetrics()
    metrics.hit()
    metrics.miss()
    metrics.miss()
    metrics.evicted()
    metrics.size(41)
    assert sample("tproxy_tls_leaf_cache_total", result="hit") == before["hit"] + 1
    assert sample("tproxy_tls_leaf_cache_total", result="miss") == before["miss"] + 2
    assert sample("tproxy_tls_leaf_cache_total", result="eviction") >= 1
    assert sample("tproxy_tls_leaf_cache_entries") == 41


def test_bump_metrics_count_verification_results_and_refused_certificates():
    metrics = BumpMetrics("bump-test")
    metrics.origin_verified("ok")
    metrics.origin_verified("expired")
    metrics.origin_verified("expired")
    metrics.client_rejected_certificate()
    assert sample("tproxy_tls_origin_verify_total", port="bump-test", result="expired") == 2
    assert sample("tproxy_tls_origin_verify_total", port="bump-test", result="ok") == 1
    assert sample("tproxy_tls_origin_verify_total", port="bump-test", result="timeout") == 0
    assert sample("tproxy_tls_client_cert_rejected_total", port="bump-test") == 1
    with pytest.raises(KeyError):
        metrics.origin_verified("www.example.com")  # never an unbounded label


def test_the_sample_configuration_shows_every_tls_key_with_its_default():
    assert C.load(str(REPO / "etc" / "tproxy.toml")).tls == C.TLSConfig()
    text = (REPO / "etc" / "tproxy.toml").read_text()
    for field in ("ca_cert", "ca_key", "ca_bundle", "leaf_cache_size", "on_verify_failure",
                  "pinned_splice_after"):  # fmt: skip
        assert f"\n{field} = " in text, field
