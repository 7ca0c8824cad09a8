"""
Operator tooling on the real kernel: `tproxy-twist rules` sets up a fresh
router namespace, `tproxy-twist check` agrees (and names what is missing
when a piece is deleted, with a fix that works), `rules --iptables` carries
a spoofed request end to end, `tproxy-twist lab` shows the whole path and
leaves nothing behind, and the access log has one line per request.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab, cleanup_stale
from tproxy_twist.lab.topology import REPO_ROOT, child_env

CLI = [sys.executable, "-m", "tproxy_twist.cli"]

CONFIG = """\
[metrics]
listen = "127.0.0.1:9464"

[timeouts]
connect = 3
response = 5

[[port]]
name = "forward"
listen = "0.0.0.0:3128"
mode = "forward"
allow = ["198.51.100.0/24", "2001:db8:1::/64"]

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
"""

needs_iptables = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v iptables"], capture_output=True).returncode != 0,
    reason="iptables is not installed",
)


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """`tproxy-twist ARGS` in the router namespace; output as text."""
    proc = lab.run(lab.router, [*CLI, *args], check=False)
    proc.stdout = proc.stdout.decode()
    proc.stderr = proc.stderr.decode()
    return proc


def apply_rules(lab: Lab, config: Path, *options: str) -> None:
    """Apply `tproxy-twist rules` output in the router, as an operator would."""
    rules = cli(lab, "rules", "--config", str(config), *options)
    assert rules.returncode == 0, rules.stderr
    lab.apply_rules(rules.stdout)


def run_fix(lab: Lab, fix: str) -> None:
    """Run a fix command `check` printed (tproxy-twist is this checkout's module here)."""
    command = fix.replace("tproxy-twist ", " ".join(CLI) + " ", 1)
    lab.run(lab.router, ["sh", "-ec", command])


def missing(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("missing")]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tooling") / "tproxy.toml"
    path.write_text(CONFIG)
    return path


def _lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def nft_lab(config_path: Path) -> Iterator[Lab]:
    """A fresh lab whose router is set up by nothing but `tproxy-twist rules`."""
    yield from _lab()


@pytest.fixture
def nft_router(nft_lab: Lab, config_path: Path) -> Lab:
    apply_rules(nft_lab, config_path)  # idempotent: repairs what an earlier test broke
    return nft_lab


@pytest.fixture(scope="module")
def ipt_lab() -> Iterator[Lab]:
    with Lab() as lab:
        lab.start_origin((80, 8080))
        yield lab


@pytest.fixture
def ipt_router(ipt_lab: Lab, config_path: Path) -> Lab:
    apply_rules(ipt_lab, config_path, "--iptables")
    return ipt_lab


# --- check after rules ----------------------------------------------------------------------


def test_check_passes_in_a_router_set_up_by_our_rules(nft_router: Lab, config_path: Path):
    check = cli(nft_router, "check", "--config", str(config_path))
    assert check.returncode == 0, check.stdout
    assert missing(check.stdout) == []
    assert check.stdout.splitlines()[-1] == "all 15 checks passed"


def test_check_names_a_deleted_fwmark_rule_and_its_fix_repairs_it(
    nft_router: Lab, config_path: Path
):
    nft_router.run(nft_router.router, ["ip", "-4", "rule", "del", "fwmark", "0x1", "lookup", "100"])
    check = cli(nft_router, "check", "--config", str(config_path))
    assert check.returncode == 1
    (line,) = missing(check.stdout)
    assert line.startswith("missing  IPv4 policy rule fwmark 0x1: no `ip -4 rule`")
    fix = check.stdout.splitlines()[check.stdout.splitlines().index(line) + 1]
    assert fix == "         fix: ip -4 rule add fwmark 0x1 lookup 100"
    run_fix(nft_router, fix.split("fix: ", 1)[1])
    assert cli(nft_router, "check", "--config", str(config_path)).returncode == 0


def _nft_rule_handle(lab: Lab, tproxy_family: str) -> int:
    out = lab.run(
        lab.router, ["nft", "-j", "-a", "list", "chain", "inet", "tproxy_twist", "prerouting"]
    ).stdout
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and any(e.get("tproxy", {}).get("family") == tproxy_family for e in rule["expr"]):
            return rule["handle"]
    raise AssertionError(f"no {tproxy_family} tproxy rule in {out!r}")


def test_check_names_a_deleted_tproxy_rule_and_its_fix_repairs_it(
    nft_router: Lab, config_path: Path
):
    handle = _nft_rule_handle(nft_router, "ip6")
    nft_router.run(
        nft_router.router,
        ["nft", "delete", "rule", "inet", "tproxy_twist", "prerouting", "handle", str(handle)],
    )
    check = cli(nft_router, "check", "--config", str(config_path))
    assert check.returncode == 1
    (line,) = missing(check.stdout)
    assert line.startswith("missing  IPv6 TPROXY rule tcp dport 80 -> :3129: no IPv6 rule")
    fix = check.stdout.splitlines()[check.stdout.splitlines().index(line) + 1]
    assert fix == f"         fix: tproxy-twist rules --config {config_path} | sh -e"
    run_fix(nft_router, fix.split("fix: ", 1)[1])
    assert cli(nft_router, "check", "--config", str(config_path)).returncode == 0


def test_check_names_a_missing_sysctl_with_its_fix(nft_router: Lab, config_path: Path):
    nft_router.run(nft_router.router, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
    check = cli(nft_router, "check", "--config", str(config_path))
    assert check.returncode == 1
    assert missing(check.stdout) == [
        "missing  IPv4 forwarding: net.ipv4.ip_forward = 0: the router does not route"
        " the clients' traffic"
    ]
    assert "         fix: sysctl -w net.ipv4.ip_forward=1" in check.stdout.splitlines()


@needs_iptables
def test_check_passes_with_iptables_rules_and_names_a_deleted_one(
    ipt_router: Lab, config_path: Path
):
    check = cli(ipt_router, "check", "--config", str(config_path))
    assert check.returncode == 0, check.stdout
    assert "(iptables)" in check.stdout
    ipt_router.run(
        ipt_router.router,
        ["iptables", "-t", "mangle", "-D", "TPROXY_TWIST", "-p", "tcp", "--dport", "80",
         "-j", "TPROXY", "--tproxy-mark", "0x1/0x1", "--on-port", "3129"],
    )  # fmt: skip
    check = cli(ipt_router, "check", "--config", str(config_path))
    assert check.returncode == 1
    (line,) = missing(check.stdout)
    assert line.startswith("missing  IPv4 TPROXY rule tcp dport 80 -> :3129")
    assert f"fix: tproxy-twist rules --config {config_path} --iptables | sh -e" in check.stdout


# --- rules --iptables, end to end ---------------------------------------------------------


def _listening(lab: Lab, port: int) -> bool:
    out = lab.run(lab.router, ["ss", "-Hltn", "sport", "=", f":{port}"], check=False).stdout
    return bool(out.strip())


@pytest.fixture
def run_proxy(tmp_path: Path) -> Iterator[Callable[[Lab, Path], subprocess.Popen]]:
    """Start `twistd -n tproxy` in a lab's router; stopped (process group) at the end."""
    started: list[tuple[Lab, subprocess.Popen]] = []

    def start(lab: Lab, config: Path, ports=(3128, 3129, 9464)) -> subprocess.Popen:
        log = tmp_path / f"proxy{len(started)}.log"
        try:
            popen = lab.start_proxy(config, log, ports=ports, timeout=60)
        except RuntimeError as e:
            pytest.fail(f"the proxy {e}")
        started.append((lab, popen))
        return popen

    yield start
    for lab, popen in started:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        lab.stop_process(popen, grace=1)


@needs_iptables
@pytest.mark.parametrize(
    "client_ip, url",
    [(Lab.CLIENT4, f"http://{Lab.ORIGIN4}/ip"), (Lab.CLIENT6, f"http://[{Lab.ORIGIN6}]/ip")],
    ids=["ipv4", "ipv6"],
)
def test_iptables_rules_carry_a_spoofed_request_end_to_end(
    ipt_router: Lab, config_path: Path, run_proxy, client_ip: str, url: str
):
    run_proxy(ipt_router, config_path)
    result = ipt_router.run(ipt_router.client, ["curl", "-sS", "--max-time", "10", "-D-", url])
    head, _, body = result.stdout.decode().partition("\r\n\r\n")
    assert "(tproxy-twist)" in head  # it went through the proxy ...
    assert json.loads(body)["client"] == client_ip  # ... which connected from the client's address


# --- tproxy-twist lab -----------------------------------------------------------------------


def _processes() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _in_a_deleted_namespace(pid: int) -> bool:
    """Alive, in a network namespace other than ours that has no name any more."""
    try:
        if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            return False
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    named = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
    return named.returncode == 0 and not named.stdout.strip()


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _lab_prefix(output: str) -> str:
    match = re.search(r"building (tpt[0-9a-f]+)-client", output)
    assert match, output
    return match.group(1)


def run_lab_command(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=REPO_ROOT,
    )


def test_the_lab_command_shows_the_clients_own_address_and_leaves_nothing_behind():
    before = _processes()
    proc = run_lab_command()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # One row per request: what was asked, the client's address, what the origin saw, verdict.
    assert (
        len([line for line in out.splitlines() if line.startswith(("IPv4 GET", "IPv6 GET"))]) == 3
    )
    assert re.search(
        rf"^IPv4 GET http://{Lab.ORIGIN4}/ip .* {Lab.CLIENT4} +{Lab.CLIENT4} +ok", out, re.M
    ), out
    assert re.search(
        rf"^IPv6 GET http://\[{Lab.ORIGIN6}\]/ip .* {Lab.CLIENT6} +{Lab.CLIENT6} +ok", out, re.M
    ), out
    assert re.search(rf"via forward port :3128 +{Lab.CLIENT4} +{Lab.ROUTER_ORIGIN4} +ok", out), out
    assert (
        'tproxy_requests_total{code="200",method="GET",mode="tproxy",port="transparent"} 2.0'
        in (out)
    )
    assert "all 19 checks passed" in out  # 15, and the TLS port's diversion and QUIC
    prefix = _lab_prefix(out)
    assert not {ns for ns in _namespaces() if ns.startswith(prefix)}
    assert not list(Path("/tmp").glob(f"{prefix}-*"))
    leaked = [pid for pid in _processes() - before if _in_a_deleted_namespace(pid)]
    assert leaked == []


def test_the_lab_command_keeps_the_lab_up_until_clean_even_past_other_sessions_cleanup():
    proc = run_lab_command("--keep")
    prefix = _lab_prefix(proc.stdout)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for role in ("client", "router", "origin"):
            assert f"ip netns exec {prefix}-{role} bash" in proc.stdout
        assert "tproxy-twist lab --clean" in proc.stdout
        # Still working after the command has exited: the proxy runs on in the router.
        result = subprocess.run(
            ["ip", "netns", "exec", f"{prefix}-client",
             "curl", "-sS", "--max-time", "10", f"http://{Lab.ORIGIN4}/ip"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert json.loads(result.stdout)["client"] == Lab.CLIENT4
        # Another test session starting now cleans up stale labs: a kept one is not stale.
        assert not [ns for ns in cleanup_stale() if ns.startswith(prefix)]
        assert {f"{prefix}-{role}" for role in ("client", "router", "origin")} <= set(_namespaces())
    finally:
        clean = run_lab_command("--clean")
    assert clean.returncode == 0
    assert f"{prefix}-router" in clean.stdout
    assert not {ns for ns in _namespaces() if ns.startswith(prefix)}


# --- the access log -------------------------------------------------------------------------

SQUID_LINE = re.compile(
    r"^ *\d+\.\d{3} +\d+ (?P<client>\S+) (?P<result>[A-Z_]+)/(?P<status>\d{3}) \d+"
    r" (?P<method>\S+) (?P<url>\S+) - (?P<hierarchy>HIER_[A-Z]+)/(?P<server>\S+) \S.*$"
)


def test_the_access_log_has_one_squid_line_per_request_including_the_proxys_own_answers(
    proxy, curl, client_python, tmp_path: Path
):
    path = tmp_path / "access.log"
    running = proxy(CONFIG + f'\n[access_log]\npath = {json.dumps(str(path))}\nformat = "squid"\n')
    assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip").stdout)["client"] == Lab.CLIENT4
    assert b" 403 " in curl("-i", f"http://{Lab.ROUTER_CLIENT4}:3129/").stdout  # direct: refused
    forward = f"http://{Lab.ROUTER_CLIENT4}:3128"
    assert b" 502 " in curl("-i", "-x", forward, f"http://{Lab.ORIGIN4}:8081/").stdout  # refused
    answer = client_python(
        "import socket\n"
        f"s = socket.create_connection(('{Lab.ROUTER_CLIENT4}', 3128))\n"
        "s.sendall(b'NOT HTTP\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
    )
    assert " 400 " in answer
    running.stop()  # a clean stop (SIGTERM) writes every queued line
    written = path.read_text().splitlines()
    assert len(written) == 4, written
    matches = [SQUID_LINE.match(line) for line in written]
    assert all(matches), written
    assert [(m["result"], m["status"], m["hierarchy"], m["server"]) for m in matches] == [
        ("TCP_MISS", "200", "HIER_DIRECT", Lab.ORIGIN4),
        ("TCP_DENIED", "403", "HIER_NONE", "-"),
        ("NONE", "502", "HIER_NONE", "-"),
        ("NONE", "400", "HIER_NONE", "-"),
    ]
    assert {m["client"] for m in matches} == {Lab.CLIENT4}


def test_an_access_log_with_a_flush_interval_gathers_lines_then_writes_them_unprompted(
    proxy, curl, tmp_path: Path
):
    path = tmp_path / "access.log"
    running = proxy(
        CONFIG + f"\n[access_log]\npath = {json.dumps(str(path))}\nflush_interval = 8\n"
    )
    for n in range(4):  # a new connection each: both workers get some
        assert json.loads(curl(f"http://{Lab.ORIGIN4}/ip?n={n}").stdout)["client"] == Lab.CLIENT4
    # The workers hold their lines for the interval (8 s after the first one)...
    assert path.read_text() == ""
    # ...then write them by themselves: no stop, no reopen.
    deadline = time.monotonic() + 60
    written: list[str] = []
    while len(written) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
        written = path.read_text().splitlines()
    assert running.alive()
    matches = [SQUID_LINE.match(line) for line in written]
    assert len(written) == 4 and all(matches), written
    assert sorted(m["url"] for m in matches) == [f"http://{Lab.ORIGIN4}/ip?n={n}" for n in range(4)]
    assert {(m["result"], m["status"]) for m in matches} == {("TCP_MISS", "200")}
