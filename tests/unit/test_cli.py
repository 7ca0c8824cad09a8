"""
The `tproxy-twist` command line: what each subcommand prints and its exit
status, without root (the checks run against a fake host; the lab's own
run is in tests/e2e/test_tooling.py).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tproxy_twist import cli, preflight
from tproxy_twist import config as C
from tproxy_twist.rules import render_for_config

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
divert = [80, 8000]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG)
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


# --- rules --------------------------------------------------------------------------------


def test_rules_prints_the_nftables_script_for_the_configs_tproxy_ports(config_file):
    status, out, err = run("rules", "--config", str(config_file))
    assert (status, err) == (0, "")
    assert out == render_for_config(C.load(str(config_file)))
    assert "tcp dport { 80, 8000 } tproxy ip6 to :3129" in out
    assert "echo 1 > /proc/sys/net/ipv4/ip_forward" in out


def test_rules_options_choose_iptables_ipv4_only_and_no_sysctls(config_file):
    status, out, _ = run(
        "rules", "-c", str(config_file), "--iptables", "--ipv4-only", "--no-sysctl"
    )
    assert status == 0
    assert "iptables -t mangle -A TPROXY_TWIST -p tcp --dport 8000 -j TPROXY" in out
    assert "ip6tables" not in out and "ip -6" not in out
    assert "/proc/sys" not in out


def test_rules_for_an_ipv4_tproxy_listener_leave_ipv6_alone(tmp_path):
    path = tmp_path / "v4.toml"
    path.write_text('[[port]]\nlisten = "0.0.0.0:3129"\nmode = "tproxy"\n')
    _, out, _ = run("rules", "--config", str(path))
    assert "tproxy ip to :3129" in out and "ip6" not in out and "ip -6" not in out


def test_rules_without_a_tproxy_port_is_a_usage_error(tmp_path):
    path = tmp_path / "forward.toml"
    path.write_text('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "forward"\n')
    status, out, err = run("rules", "--config", str(path))
    assert (status, out) == (2, "")
    assert 'no port has mode = "tproxy"' in err


def test_the_rules_script_is_valid_sh(config_file, tmp_path):
    for options in ([], ["--iptables"]):
        _, out, _ = run("rules", "--config", str(config_file), *options)
        script = tmp_path / "rules.sh"
        script.write_text(out)
        subprocess.run(["sh", "-n", str(script)], check=True)


# --- configuration errors ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "rules", "lab"])
def test_a_config_error_prints_the_message_and_exits_2(command, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    path = tmp_path / "bad.toml"
    path.write_text('[[port]]\nlisten = "0.0.0.0:3129"\nmode = "tproxi"\n')
    status, out, err = run(command, "--config", str(path))
    assert status == 2
    assert err == f"{path}: port[0].mode: must be one of tproxy, forward, intercept, not 'tproxi'\n"


def test_a_missing_config_names_the_file_and_no_traceback_reaches_the_user(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tproxy_twist.cli", "check", "--config", str(tmp_path / "x.toml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"{tmp_path / 'x.toml'}: file not found\n"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_no_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit:
        cli.main([], io.StringIO(), io.StringIO())
    assert exit.value.code == 2


# --- the default configuration ------------------------------------------------------------


def test_default_config_prefers_the_installed_one_then_the_checkout(tmp_path, monkeypatch):
    installed = tmp_path / "etc-tproxy-twist.toml"
    monkeypatch.setattr(C, "SYSTEM_PATH", str(installed))
    monkeypatch.chdir(tmp_path)
    assert C.load_default().path == C._CHECKOUT_PATH
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "tproxy.toml").write_text(CONFIG)
    assert C.load_default().path == "etc/tproxy.toml"
    installed.write_text(CONFIG)
    assert C.load_default().path == str(installed)


def test_no_config_anywhere_names_every_path_tried_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SYSTEM_PATH", str(tmp_path / "nowhere.toml"))
    monkeypatch.setattr(C, "_CHECKOUT_PATH", str(tmp_path / "checkout" / "etc" / "tproxy.toml"))
    monkeypatch.chdir(tmp_path)
    status, out, err = run("check")
    assert status == 2
    for path in (tmp_path / "nowhere.toml", "etc/tproxy.toml", tmp_path / "checkout"):
        assert str(path) in err
    assert "--config" in err


def test_twistd_tproxy_and_tproxy_twist_use_the_same_default_config():
    from tproxy_twist.tap import Options

    options = Options()
    assert options["config"] is None  # postOptions loads C.load_default(), as the CLI does
    for path in C.default_paths():
        assert path in options.docs["config"]


def twistd(*argv: str) -> subprocess.CompletedProcess:
    from tproxy_twist.lab import TWISTD

    return subprocess.run(
        [*TWISTD, "tproxy", *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_a_config_error_under_twistd_is_said_first_and_alone(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text(CONFIG + "bogus = 1\n")
    result = twistd("--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tproxy-twist: {path}: port[1].bogus: unknown key (allowed here: ")
    assert "listen, mode, name" in lines[0]


def test_an_access_log_directory_that_does_not_exist_is_one_line_at_start(tmp_path):
    path = tmp_path / "tproxy.toml"
    path.write_text(f'[access_log]\npath = "{tmp_path}/missing/access.log"\n' + CONFIG)
    result = twistd("--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"tproxy-twist: {path}: access_log.path: directory {tmp_path}/missing does not exist"
    ]


def test_an_access_log_directory_the_workers_cannot_write_is_one_line_at_start(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir(mode=0o755)
    path = tmp_path / "tproxy.toml"
    path.write_text(f'user = "nobody"\n[access_log]\npath = "{directory}/access.log"\n' + CONFIG)
    result = twistd("--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"tproxy-twist: {path}: access_log.path: directory {directory} is not writable by"
        " nobody, the user the workers run as"
    ]


def test_metrics_on_a_proxy_port_is_a_config_error():
    with pytest.raises(C.ConfigError, match="metrics.listen: 0.0.0.0:3128 is also port.0"):
        C.loads('[metrics]\nlisten = "0.0.0.0:3128"\n' + CONFIG)


def test_version_is_tproxy_twists_own_under_both_commands():
    from importlib.metadata import version

    expected = f"tproxy-twist {version('tproxy-twist')}"
    assert twistd("--version").stdout.strip() == expected
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    result = subprocess.run(
        [sys.executable, "-m", "tproxy_twist.cli", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == expected


def test_help_documents_the_default_config(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["check", "--help"])
    assert exit.value.code == 0
    assert "/etc/tproxy-twist/tproxy.toml" in " ".join(capsys.readouterr().out.split())


# --- check --------------------------------------------------------------------------------


def fake_checks(results: list[preflight.Check]):
    def run_checks(config, host=None, *, ipv4_only=False, rules_fix=None):
        return results

    return run_checks


def test_check_prints_one_line_per_check_and_exits_0_when_all_pass(config_file, monkeypatch):
    monkeypatch.setattr(
        cli,
        "run_checks",
        fake_checks([preflight.Check("capability", True, "CAP_NET_ADMIN in the effective set")]),
    )
    status, out, _ = run("check", "--config", str(config_file))
    assert status == 0
    assert out.splitlines() == [
        f"tproxy-twist check: {config_file}: tproxy transparent [::]:3129 (divert 80,8000)",
        "ok       capability: CAP_NET_ADMIN in the effective set",
        "all 1 checks passed",
    ]


def test_check_names_what_is_missing_with_its_fix_and_exits_1(config_file, monkeypatch):
    monkeypatch.setattr(
        cli,
        "run_checks",
        fake_checks(
            [
                preflight.Check("capability", True, "fine"),
                preflight.Check(
                    "IPv4 policy rule fwmark 0x1",
                    False,
                    "no rule",
                    "ip -4 rule add fwmark 0x1 lookup 100",
                ),
            ]
        ),
    )
    status, out, _ = run("check", "--config", str(config_file))
    assert status == 1
    assert "missing  IPv4 policy rule fwmark 0x1: no rule\n" in out
    assert "         fix: ip -4 rule add fwmark 0x1 lookup 100\n" in out
    assert out.endswith(
        "1 of 2 checks missing: run the fix commands above (as root), then check again\n"
    )


def test_check_passes_ipv4_only_on(config_file, monkeypatch):
    seen = {}

    def run_checks(config, host=None, *, ipv4_only=False, rules_fix=None):
        seen["ipv4_only"] = ipv4_only
        return []

    monkeypatch.setattr(cli, "run_checks", run_checks)
    status, out, _ = run("check", "--config", str(config_file), "--ipv4-only")
    assert status == 0 and seen == {"ipv4_only": True}
    assert "nothing to check" in out


def test_check_without_a_tproxy_port_has_nothing_to_check(tmp_path):
    path = tmp_path / "forward.toml"
    path.write_text('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "forward"\n')
    status, out, _ = run("check", "--config", str(path))
    assert status == 0
    assert out == f"{path}: no tproxy port: nothing to check\n"


# --- lab --------------------------------------------------------------------------------


def test_lab_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status, out, err = run("lab")
    assert status == 2
    assert "needs root" in err


def test_lab_keep_and_clean_exclude_each_other():
    with pytest.raises(SystemExit):
        cli.main(["lab", "--keep", "--clean"], io.StringIO(), io.StringIO())


def test_the_built_in_lab_config_is_the_sample_with_the_lab_client_allowed(tmp_path):
    from tproxy_twist.lab.scenario import LAB_CONFIG

    text = LAB_CONFIG.format(access_log='"/tmp/lab/access.log"')
    lab = C.loads(text)
    sample = C.load(REPO / "etc" / "tproxy.toml")
    assert [(p.name, p.listen, p.mode, p.divert) for p in lab.ports] == [
        (p.name, p.listen, p.mode, p.divert) for p in sample.ports
    ]
    forward = next(p for p in lab.ports if p.mode == "forward")
    assert forward.allows("198.51.100.2") and forward.allows("2001:db8:1::2")
    assert lab.metrics_listen == sample.metrics_listen
    assert lab.access_log == C.AccessLogConfig(path="/tmp/lab/access.log", format="squid")
