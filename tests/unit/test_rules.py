"""Rendering of the TPROXY set-up scripts (tproxy_twist.rules), without root.

The scripts are run here against stub ``ip``/``nft``/``iptables`` commands that
record their calls; tests/e2e/test_lab.py applies them to a real kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tproxy_twist import config as C
from tproxy_twist.rules import (
    DivertPort,
    divert_ports,
    nftables_ruleset,
    quic_blocks,
    render_for_config,
    render_iptables,
    render_kernel_settings,
    render_nftables,
    serves_ipv6,
)

ONE_PORT = [DivertPort(3129, (80,))]
REPO = Path(__file__).resolve().parents[2]


def lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()]


def commands(script: str) -> list[str]:
    """The script's non-comment, non-blank lines."""
    return [line for line in lines(script) if line and not line.startswith("#")]


# -- DivertPort ---------------------------------------------------------------------


def test_divert_port_defaults_to_port_80_and_takes_any_sequence() -> None:
    assert DivertPort(3129).divert == (80,)
    assert DivertPort(3129, [80, 8080]).divert == (80, 8080)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"listen_port": 0},
        {"listen_port": 65536},
        {"listen_port": True},
        {"listen_port": 3129, "divert": ()},
        {"listen_port": 3129, "divert": (80, 0)},
        {"listen_port": 3129, "divert": (80, 80)},
    ],
)
def test_divert_port_rejects_impossible_ports(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DivertPort(**kwargs)


# -- nftables ----------------------------------------------------------------------


def test_nftables_one_port_rules() -> None:
    script = render_nftables(ONE_PORT)
    cmds = commands(script)
    assert cmds[0] == "set -e"
    assert cmds[1:5] == [
        "nft -f - <<'EOF'",
        "table inet tproxy_twist {}",
        "delete table inet tproxy_twist",
        "table inet tproxy_twist {",
    ]
    assert "type filter hook prerouting priority mangle; policy accept;" in cmds
    rules = [c for c in cmds if c.startswith("meta ")]
    assert rules == [
        "meta l4proto tcp socket transparent 1 meta mark set 0x1 accept",
        "meta nfproto ipv4 tcp dport { 80 } tproxy ip to :3129 meta mark set 0x1 accept",
        "meta nfproto ipv6 tcp dport { 80 } tproxy ip6 to :3129 meta mark set 0x1 accept",
    ]
    assert 'if [ -z "$(ip -4 rule show fwmark 0x1 lookup 100)" ]; then' in cmds
    assert "ip -4 rule add fwmark 0x1 lookup 100" in cmds
    assert "ip -4 route replace local 0.0.0.0/0 dev lo table 100" in cmds
    assert "ip -6 rule add fwmark 0x1 lookup 100" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 100" in cmds


def test_nftables_script_says_why_proxy_traffic_is_not_diverted() -> None:
    script = render_nftables(ONE_PORT)
    assert "OUTPUT, not PREROUTING" in script
    assert "fail-open" in script


def test_nftables_never_hooks_output_so_the_proxys_own_traffic_is_not_intercepted() -> None:
    cmds = commands(render_nftables(ONE_PORT))
    hooks = [c for c in cmds if c.startswith("type ")]
    assert hooks == ["type filter hook prerouting priority mangle; policy accept;"]


def test_nftables_lets_traffic_to_the_routers_own_addresses_through_before_diverting() -> None:
    """A client opening the router's own web UI on port 80 must reach it, not the proxy."""
    cmds = commands(render_nftables([DivertPort(3129, (80,)), DivertPort(3130, (81,))]))
    local = cmds.index("fib daddr type local accept")
    socket_rule = next(i for i, c in enumerate(cmds) if "socket transparent 1" in c)
    tproxy_rules = [i for i, c in enumerate(cmds) if " tproxy " in c]
    assert socket_rule < local < min(tproxy_rules)


def test_nftables_several_ports_keep_their_order_and_share_the_socket_rule() -> None:
    script = render_nftables([DivertPort(3129, (80, 8000)), DivertPort(3130, (81,))])
    rules = [c for c in commands(script) if c.startswith("meta ")]
    assert rules[0].startswith("meta l4proto tcp socket transparent 1")
    assert rules[1:] == [
        "meta nfproto ipv4 tcp dport { 80, 8000 } tproxy ip to :3129 meta mark set 0x1 accept",
        "meta nfproto ipv6 tcp dport { 80, 8000 } tproxy ip6 to :3129 meta mark set 0x1 accept",
        "meta nfproto ipv4 tcp dport { 81 } tproxy ip to :3130 meta mark set 0x1 accept",
        "meta nfproto ipv6 tcp dport { 81 } tproxy ip6 to :3130 meta mark set 0x1 accept",
    ]


def test_nftables_ipv4_only_has_no_ipv6_rules_or_routes() -> None:
    script = render_nftables(ONE_PORT, ipv4_only=True)
    cmds = commands(script)
    assert not [c for c in cmds if "ip6" in c or "ip -6" in c or "ipv6" in c]
    assert "ip -4 route replace local 0.0.0.0/0 dev lo table 100" in cmds


def test_nftables_mark_and_table_are_configurable() -> None:
    cmds = commands(render_nftables(ONE_PORT, mark=0x20, table=123))
    assert "meta l4proto tcp socket transparent 1 meta mark set 0x20 accept" in cmds
    assert "ip -4 rule add fwmark 0x20 lookup 123" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 123" in cmds


# -- iptables ----------------------------------------------------------------------


def test_iptables_one_port_rules() -> None:
    cmds = commands(render_iptables(ONE_PORT))
    for cmd in ("iptables", "ip6tables"):
        assert f"{cmd} -t mangle -N DIVERT 2>/dev/null || true" in cmds
        assert f"{cmd} -t mangle -F DIVERT" in cmds
        assert f"{cmd} -t mangle -A DIVERT -j MARK --set-mark 0x1" in cmds
        assert f"{cmd} -t mangle -A DIVERT -j ACCEPT" in cmds
        assert f"{cmd} -t mangle -F TPROXY_TWIST" in cmds
        socket_rule = f"{cmd} -t mangle -A TPROXY_TWIST -p tcp -m socket --transparent -j DIVERT"
        tproxy_rule = (
            f"{cmd} -t mangle -A TPROXY_TWIST -p tcp --dport 80 -j TPROXY "
            "--tproxy-mark 0x1/0x1 --on-port 3129"
        )
        local = f"{cmd} -t mangle -A TPROXY_TWIST -m addrtype --dst-type LOCAL -j RETURN"
        assert cmds.index(socket_rule) < cmds.index(local) < cmds.index(tproxy_rule)
        check = cmds.index(f"{cmd} -t mangle -C PREROUTING -j TPROXY_TWIST 2>/dev/null ||")
        assert cmds[check + 1] == f"{cmd} -t mangle -A PREROUTING -j TPROXY_TWIST"
    assert "ip -4 rule add fwmark 0x1 lookup 100" in cmds
    assert "ip -6 route replace local ::/0 dev lo table 100" in cmds


def test_iptables_ipv4_only_never_calls_ip6tables() -> None:
    cmds = commands(render_iptables(ONE_PORT, ipv4_only=True))
    assert not [c for c in cmds if "ip6tables" in c or "ip -6" in c]


def test_iptables_one_rule_per_diverted_port() -> None:
    cmds = commands(render_iptables([DivertPort(3129, (80, 8000))], ipv4_only=True))
    assert [c for c in cmds if "-j TPROXY " in c] == [
        "iptables -t mangle -A TPROXY_TWIST -p tcp --dport 80 -j TPROXY "
        "--tproxy-mark 0x1/0x1 --on-port 3129",
        "iptables -t mangle -A TPROXY_TWIST -p tcp --dport 8000 -j TPROXY "
        "--tproxy-mark 0x1/0x1 --on-port 3129",
    ]


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("render", [render_nftables, render_iptables])
@pytest.mark.parametrize(
    "ports, kwargs, message",
    [
        ([], {}, "no tproxy ports"),
        ([DivertPort(3129, (80,)), DivertPort(3130, (80,))], {}, "diverted to both"),
        (ONE_PORT, {"mark": 0}, "mark"),
        (ONE_PORT, {"table": 254}, "table"),
        (ONE_PORT, {"table": 0}, "table"),
    ],
)
def test_render_rejects_unusable_input(render, ports, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        render(ports, **kwargs)


# -- the scripts as shell programs ---------------------------------------------------


@pytest.mark.parametrize("render", [render_nftables, render_iptables])
@pytest.mark.parametrize("ipv4_only", [False, True])
def test_script_is_valid_posix_sh(render, ipv4_only: bool, tmp_path: Path) -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    path = tmp_path / "rules.sh"
    path.write_text(render([DivertPort(3129, (80, 443))], ipv4_only=ipv4_only))
    subprocess.run([sh, "-n", str(path)], check=True)


# Stub commands: each appends its argv to $CALLS; `ip rule`, `iptables -C` answer
# from the state the earlier calls left in $STATE, like the real ones would.
STUB_IP = """\
#!/bin/sh
echo "ip $*" >> "$CALLS"
if [ "$2" = rule ] && [ "$3" = show ]; then
    grep -F -- "$1 $5 $7" "$STATE" 2>/dev/null | sed 's/^/32765: from all /' || true
elif [ "$2" = rule ] && [ "$3" = add ]; then
    echo "$1 $5 $7" >> "$STATE"
fi
exit 0
"""
STUB_IPTABLES = """\
#!/bin/sh
name=$(basename "$0")
echo "$name $*" >> "$CALLS"
case "$3" in
    -N) grep -qxF "$name chain $4" "$STATE" 2>/dev/null && exit 1
        echo "$name chain $4" >> "$STATE" ;;
    -C) shift 3; grep -qxF "$name rule $*" "$STATE" 2>/dev/null || exit 1 ;;
    -A) shift 3; echo "$name rule $*" >> "$STATE" ;;
esac
exit 0
"""
STUB_NFT = """\
#!/bin/sh
echo "nft $*" >> "$CALLS"
cat > /dev/null
"""


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("ip", STUB_IP),
        ("iptables", STUB_IPTABLES),
        ("ip6tables", STUB_IPTABLES),
        ("nft", STUB_NFT),
    ]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        CALLS=str(tmp_path / "calls"),
        STATE=str(tmp_path / "state"),
    )
    return env


def run_script(script: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """Run ``script`` with ``sh -e`` against the stubs; return the calls it made."""
    path = tmp_path / "rules.sh"
    path.write_text(script)
    calls = Path(env["CALLS"])
    calls.write_text("")
    subprocess.run(["sh", "-e", str(path)], env=env, check=True, capture_output=True)
    return calls.read_text().splitlines()


def test_nftables_script_adds_policy_rules_only_once(stub_env, tmp_path) -> None:
    script = render_nftables(ONE_PORT)
    first = run_script(script, stub_env, tmp_path)
    second = run_script(script, stub_env, tmp_path)
    assert "ip -4 rule add fwmark 0x1 lookup 100" in first
    assert "ip -6 rule add fwmark 0x1 lookup 100" in first
    assert not [c for c in second if " rule add " in c]
    # The table is replaced on every run, in one nft transaction.
    assert [c for c in second if c.startswith("nft")] == ["nft -f -"]
    assert "ip -4 route replace local 0.0.0.0/0 dev lo table 100" in second


def test_iptables_script_appends_prerouting_jump_only_once(stub_env, tmp_path) -> None:
    script = render_iptables(ONE_PORT)
    run_script(script, stub_env, tmp_path)
    second = run_script(script, stub_env, tmp_path)
    assert not [c for c in second if "-A PREROUTING" in c]
    assert not [c for c in second if " rule add " in c]
    state = Path(stub_env["STATE"]).read_text().splitlines()
    assert state.count("iptables rule PREROUTING -j TPROXY_TWIST") == 1
    assert state.count("ip6tables rule PREROUTING -j TPROXY_TWIST") == 1


def test_nftables_script_passes_ruleset_to_nft_on_stdin(tmp_path: Path) -> None:
    """The heredoc reaches nft intact (what `nft -f -` would parse)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nft").write_text('#!/bin/sh\ncat > "$OUT"\n')
    (bin_dir / "ip").write_text("#!/bin/sh\nexit 0\n")
    for name in ("nft", "ip"):
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "ruleset")
    )
    path = tmp_path / "rules.sh"
    path.write_text(render_nftables(ONE_PORT))
    subprocess.run(["sh", "-e", str(path)], env=env, check=True)
    ruleset = (tmp_path / "ruleset").read_text()
    assert ruleset.startswith(
        textwrap.dedent("""\
        table inet tproxy_twist {}
        delete table inet tproxy_twist
        table inet tproxy_twist {
            chain prerouting {
                type filter hook prerouting priority mangle; policy accept;
        """)
    )
    assert ruleset.rstrip().endswith("}")
    assert "EOF" not in ruleset


# -- from a configuration ------------------------------------------------------------


def config(text: str) -> C.Config:
    return C.loads(text, "/etc/tproxy-twist/tproxy.toml")


MIXED = config(
    """
[[port]]
listen = "0.0.0.0:3128"
mode = "forward"

[[port]]
listen = "[::]:3129"
mode = "tproxy"
divert = [80, 8000]

[[port]]
listen = "0.0.0.0:3130"
mode = "tproxy"

[[port]]
listen = "0.0.0.0:3131"
mode = "intercept"
"""
)


def test_divert_ports_are_the_tproxy_ports_with_their_divert_lists() -> None:
    assert divert_ports(MIXED) == [DivertPort(3129, (80, 8000)), DivertPort(3130, (80,))]


def test_a_config_diverting_one_port_to_two_tproxy_ports_is_refused() -> None:
    with pytest.raises(ValueError, match="diverted to both"):
        render_for_config(MIXED)


def test_serves_ipv6_when_a_tproxy_port_listens_on_ipv6() -> None:
    v4 = config('[[port]]\nlisten = "0.0.0.0:3129"\nmode = "tproxy"\n')
    v6 = config('[[port]]\nlisten = "3129"\nmode = "tproxy"\n')
    assert not serves_ipv6(v4) and serves_ipv6(v6)


def test_render_for_config_is_rules_plus_kernel_settings() -> None:
    conf = config('[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\ndivert = [80, 8080]\n')
    ports = [DivertPort(3129, (80, 8080))]
    assert render_for_config(conf) == render_nftables(ports) + "\n" + render_kernel_settings()
    assert render_for_config(conf, iptables=True, kernel_settings=False) == render_iptables(ports)
    assert render_for_config(conf, ipv4_only=True, kernel_settings=False) == render_nftables(
        ports, ipv4_only=True
    )


def test_render_for_config_leaves_ipv6_alone_for_ipv4_listeners() -> None:
    conf = config('[[port]]\nlisten = "0.0.0.0:3129"\nmode = "tproxy"\n')
    assert "ip6" not in render_for_config(conf) and "ipv6" not in render_for_config(conf)


def test_render_for_config_without_tproxy_ports_says_so() -> None:
    conf = config('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "forward"\n')
    with pytest.raises(ValueError, match="nothing to divert"):
        render_for_config(conf)


def test_kernel_settings_turn_on_forwarding_and_loosen_only_strict_rp_filter() -> None:
    cmds = commands(render_kernel_settings())
    assert "echo 1 > /proc/sys/net/ipv4/ip_forward" in cmds
    assert "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding" in cmds
    assert 'if [ "$(cat "$f")" = 1 ]; then echo 2 > "$f"; fi' in cmds
    assert "echo 1 > /proc/sys/net/ipv4/tcp_migrate_req" in cmds
    assert "ipv6" not in render_kernel_settings(ipv4_only=True)


# -- the files in etc/ ---------------------------------------------------------------------


def sample() -> C.Config:
    return C.load(REPO / "etc" / "tproxy.toml")


def test_etc_nftables_conf_is_the_ruleset_for_the_sample_config() -> None:
    """Regenerate with: python -c 'from tproxy_twist import config, rules;
    c = config.load("etc/tproxy.toml"); print(rules.nftables_ruleset(rules.divert_ports(c),
    quic=rules.quic_blocks(c)), end="")'
    below etc/nftables.conf's comment header."""
    text = (REPO / "etc" / "nftables.conf").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()
    expected = nftables_ruleset(
        divert_ports(sample()), ipv4_only=not serves_ipv6(sample()), quic=quic_blocks(sample())
    )
    assert body == expected.strip()


def test_etc_iptables_sh_is_the_rules_output_for_the_sample_config() -> None:
    """Regenerate with: tproxy-twist rules --iptables --config etc/tproxy.toml (and keep
    its "Generated by" line)."""
    text = (REPO / "etc" / "iptables.sh").read_text()
    first, generated, rest = text.split("\n", 2)
    assert generated.startswith("# Generated by `tproxy-twist rules --iptables")
    assert first + "\n" + rest == render_for_config(sample(), iptables=True)


def test_etc_nftables_conf_loads_as_an_nft_ruleset_file(tmp_path: Path) -> None:
    """`nft -c` validates it with the kernel without committing anything; in a throwaway
    network namespace (unshare --net) all the same."""
    nft, unshare = shutil.which("nft"), shutil.which("unshare")
    if nft is None or unshare is None or os.geteuid() != 0:
        pytest.skip("needs nft, unshare and root")
    proc = subprocess.run(
        [unshare, "--net", nft, "-c", "-f", str(REPO / "etc" / "nftables.conf")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
