"""
Operating TLS ports: the rules that divert them and reject QUIC, and what
`tproxy-twist check` says about QUIC.  No root needed except for the `nft -c`
validation, which runs in a throwaway network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from tproxy_twist import config as C
from tproxy_twist import preflight as P
from tproxy_twist import rules as R

TLS_CONFIG = """
[[port]]
listen = "[::]:3129"
mode = "tproxy"

[[port]]
name = "tls"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
"""


def config(extra: str = "") -> C.Config:
    return C.loads(TLS_CONFIG + extra, "/etc/tproxy-twist/tproxy.toml")


def test_tls_ports_are_diverted_like_any_tproxy_port():
    assert R.divert_ports(config()) == [R.DivertPort(3129, (80,)), R.DivertPort(3130, (443,))]
    script = R.render_for_config(config())
    assert "meta nfproto ipv4 tcp dport { 443 } tproxy ip to :3130 meta mark set 0x1 accept" in (
        script
    )


def test_quic_is_rejected_from_everyone_when_the_tls_port_allows_everyone():
    ruleset = R.nftables_ruleset(R.divert_ports(config()), quic=R.quic_blocks(config()))
    assert "type filter hook forward priority filter; policy accept;" in ruleset
    assert "meta nfproto ipv4 udp dport { 443 } reject" in ruleset
    assert "meta nfproto ipv6 udp dport { 443 } reject" in ruleset


def test_quic_is_rejected_from_the_ports_client_networks_only():
    conf = config('allow = ["198.51.100.0/24", "2001:db8:1::/48"]\n')
    ruleset = R.nftables_ruleset(R.divert_ports(conf), quic=R.quic_blocks(conf))
    assert "meta nfproto ipv4 ip saddr { 198.51.100.0/24 } udp dport { 443 } reject" in ruleset
    assert "meta nfproto ipv6 ip6 saddr { 2001:db8:1::/48 } udp dport { 443 } reject" in ruleset
    script = R.render_for_config(conf, iptables=True)
    assert (
        "iptables -t filter -A TPROXY_TWIST_QUIC -s 198.51.100.0/24 -p udp --dport 443 -j REJECT"
        in script
    )
    assert "ip6tables -t filter -I FORWARD -j TPROXY_TWIST_QUIC" in script


def test_block_quic_false_leaves_udp_alone_unless_the_flag_asks():
    conf = config("block_quic = false\n")
    assert R.quic_blocks(conf) == []
    assert "udp dport" not in R.render_for_config(conf)
    assert "udp dport { 443 } reject" in R.render_for_config(conf, block_quic=True)


def test_configs_without_tls_ports_get_no_forward_chain():
    conf = C.loads('[[port]]\nlisten = "3129"\nmode = "tproxy"\n')
    assert "chain forward" not in R.render_for_config(conf, block_quic=True)


def test_the_quic_ruleset_loads_into_nftables(tmp_path):
    """`nft -c` checks it with the kernel in a throwaway network namespace."""
    nft, unshare = shutil.which("nft"), shutil.which("unshare")
    if nft is None or unshare is None or os.geteuid() != 0:
        pytest.skip("needs nft, unshare and root")
    conf = config('allow = ["198.51.100.0/24", "2001:db8:1::/48"]\n')
    path = tmp_path / "ruleset.nft"
    path.write_text(R.nftables_ruleset(R.divert_ports(conf), quic=R.quic_blocks(conf)))
    proc = subprocess.run([unshare, "--net", nft, "-c", "-f", str(path)], capture_output=True)
    assert proc.returncode == 0, proc.stderr


# --- check -------------------------------------------------------------------------

# `nft -j list ruleset` after loading the ruleset above (recorded; prerouting rules cut).
NFT_WITH_QUIC = {
    "nftables": [
        {"table": {"family": "inet", "name": "tproxy_twist", "handle": 2}},
        {"chain": {"family": "inet", "table": "tproxy_twist", "name": "forward", "handle": 2,
                   "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "tproxy_twist", "chain": "forward", "handle": 9,
                  "expr": [
                      {"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                                  "field": "saddr"}},
                                 "right": {"prefix": {"addr": "198.51.100.0", "len": 24}}}},
                      {"match": {"op": "==", "left": {"payload": {"protocol": "udp",
                                                                  "field": "dport"}},
                                 "right": 443}},
                      {"reject": {"type": "icmp", "expr": "port-unreachable"}}]}},
    ]
}  # fmt: skip


class QuicHost:
    def __init__(self, nft: dict, iptables: str = "", ip6tables: str = "") -> None:
        self.outputs = {
            ("nft", "-j", "list", "ruleset"): json.dumps(nft),
            ("iptables-save", "-t", "filter"): iptables,
            ("ip6tables-save", "-t", "filter"): ip6tables,
        }

    def run(self, argv):
        return P.CommandResult(0, self.outputs.get(tuple(argv), ""), "")


FAMILIES = [socket.AF_INET, socket.AF_INET6]


def test_check_finds_the_quic_rejection_per_family_and_says_why_it_matters():
    checks = P.check_quic_blocked(QuicHost(NFT_WITH_QUIC), config(), FAMILIES, fix="FIX")
    (v4, v6) = checks
    assert v4.ok and v4.name == "IPv4 QUIC blocked for TLS port :3130 (udp dport 443)"
    assert not v6.ok and v6.fix == "FIX"
    assert "QUIC (HTTP/3 over UDP)" in v6.detail and "fall back to TCP" in v6.detail


def test_check_reads_iptables_rejections_too():
    saved = "*filter\n:FORWARD ACCEPT [0:0]\n-A TPROXY_TWIST_QUIC -p udp -m udp --dport 443 -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n"  # noqa: E501
    checks = P.check_quic_blocked(QuicHost({}, saved, saved), config(), FAMILIES, fix="FIX")
    assert all(c.ok for c in checks)


def test_check_does_not_count_tcp_or_accepting_rules():
    saved = "*filter\n-A FORWARD -p tcp --dport 443 -j REJECT\n-A FORWARD -p udp --dport 443 -j ACCEPT\nCOMMIT\n"  # noqa: E501
    checks = P.check_quic_blocked(QuicHost({}, saved, saved), config(), FAMILIES, fix="FIX")
    assert not any(c.ok for c in checks)


def test_check_accepts_quic_left_open_by_choice_but_says_what_it_costs():
    checks = P.check_quic_blocked(QuicHost({}), config("block_quic = false\n"), FAMILIES, fix="F")
    assert all(c.ok for c in checks)
    assert "block_quic = false" in checks[0].detail and "passes a TCP proxy by" in checks[0].detail


def test_check_has_nothing_to_say_without_tls_ports():
    conf = C.loads('[[port]]\nlisten = "3129"\nmode = "tproxy"\n')
    assert P.check_quic_blocked(QuicHost({}), conf, FAMILIES, fix="F") == []
