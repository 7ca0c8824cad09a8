"""`twistd tproxy` as a user meets it: listed, documented, and clear about mistakes."""

import subprocess
import sys

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]  # fmt: skip


def twistd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*TWISTD, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_twistd_lists_the_tproxy_plugin():
    result = twistd("--help")
    assert result.returncode == 0
    assert "tproxy" in result.stdout
    assert "Transparent (TPROXY) HTTP proxy" in result.stdout


def test_twistd_tproxy_help_documents_config_and_workers():
    result = twistd("tproxy", "--help")
    assert result.returncode == 0
    assert "--config=" in result.stdout and "--workers=" in result.stdout


def test_a_config_mistake_exits_non_zero_naming_the_key_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "tproxi"\n')
    result = twistd("-n", "--pidfile=", "tproxy", "--config", str(bad))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "port[0].mode: must be one of tproxy, forward, intercept, not 'tproxi'" in output
    assert "Traceback" not in output
