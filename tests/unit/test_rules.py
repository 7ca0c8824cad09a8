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

from tproxy_twist.rules import DivertPort, render_iptables, render_nftables

ONE_PORT = [DivertPort(3129, (80,))]


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
        assert cmds.index(socket_rule) < cmds.index(tproxy_rule)
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
