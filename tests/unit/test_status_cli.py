"""`tproxy-twist status`: where it reads, what it prints, --watch, and its errors."""

from __future__ import annotations

import io
import json

import pytest
from test_status_document import sample_document

from tproxy_twist import cli
from tproxy_twist.status_cli import DEFAULT_URL, format_status


def run(argv: list[str], get, sleep=None) -> tuple[int, str, str]:
    """Run `tproxy-twist status ARGV` with a fake fetch (and sleep)."""
    from tproxy_twist.status_cli import cmd_status

    out, err = io.StringIO(), io.StringIO()
    args = cli._parser().parse_args(["status", *argv])
    try:
        code = cmd_status(args, out, cli._Usage, get=get, sleep=sleep or pytest.fail)
    except cli._Usage as e:
        err.write(str(e))
        code = cli.EXIT_USAGE
    return code, out.getvalue(), err.getvalue()


def test_the_table_shows_every_port_worker_and_the_latest_problems():
    text = format_status(sample_document())
    lines = text.splitlines()
    assert lines[0].startswith("tproxy-twist 1.2.3  master pid 42")
    assert "workers 1/2 ready" in lines[0] and "last reload: ok" in lines[1]
    [port] = [line for line in lines if line.startswith("transparent ")]
    assert "[::]:3129" in port and "44/0/0/11" in port and "refused=11" in port
    assert any(line.startswith("tls ") for line in lines)
    [w2] = [line for line in lines if " 502 " in line and "silent" in line]
    assert w2.split()[-1] == "4"  # restarts
    assert "recent problems (3 of 3, newest first):" in text
    assert "198.51.100.2 GET 203.0.113.2:81 upstream_error:refused -> 502" in text


def test_the_url_comes_from_the_configuration_or_url(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('[metrics]\nlisten = "0.0.0.0:9500"\n[[port]]\nlisten = "[::]:3129"\n'
                      'mode = "tproxy"\n')  # fmt: skip
    asked = []

    def get(url):
        asked.append(url)
        return sample_document()

    assert run(["--config", str(config)], get)[0] == 0
    assert run(["--url", "192.0.2.1:9464"], get)[0] == 0
    assert run(["--url", "http://[::1]:9464/status.json"], get)[0] == 0
    assert asked == [
        "http://127.0.0.1:9500/status.json",
        "http://192.0.2.1:9464/status.json",
        "http://[::1]:9464/status.json",
    ]


def test_without_a_configuration_it_asks_the_default_listener(tmp_path, monkeypatch):
    from tproxy_twist import config as configuration

    monkeypatch.setattr(configuration, "default_paths", lambda: [str(tmp_path / "none.toml")])
    asked = []
    run([], lambda url: asked.append(url) or sample_document())
    assert asked == [DEFAULT_URL]


def test_a_configuration_without_metrics_is_a_usage_error_naming_the_file(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text('[metrics]\nlisten = ""\n[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n')
    code, _, err = run(["--config", str(config)], lambda url: pytest.fail("fetched"))
    assert code == 2 and str(config) in err and "--url" in err


def test_an_unreachable_proxy_is_one_line_and_exit_1():
    def get(url):
        raise OSError("Connection refused")

    code, out, _ = run(["--url", "127.0.0.1:1"], get)
    assert (code, out) == (1, "tproxy-twist status: cannot read http://127.0.0.1:1/status.json:"
                              " Connection refused\n")  # fmt: skip


def test_watch_prints_again_until_interrupted():
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    code, out, _ = run(["--url", "h:1", "--watch", "0.5"], lambda url: sample_document(), sleep)
    assert code == 0 and naps == [0.5, 0.5, 0.5]
    assert out.count("\x1b[H\x1b[2J") == 3 and out.count("tproxy-twist 1.2.3") == 3


def test_watch_needs_a_positive_interval_and_json_prints_the_document():
    code, _, err = run(["--url", "h:1", "--watch", "0"], lambda url: sample_document())
    assert code == 2 and "positive" in err
    code, out, _ = run(["--url", "h:1", "--json"], lambda url: sample_document())
    assert code == 0 and json.loads(out) == sample_document()


def test_fetch_refuses_what_is_not_a_status_document(tmp_path):
    from tproxy_twist.status_cli import fetch

    page = tmp_path / "x.json"
    page.write_text('{"schema": 99}')
    with pytest.raises(ValueError, match="not a tproxy-twist status document"):
        fetch(page.as_uri())
