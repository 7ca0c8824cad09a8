"""Fixtures for end-to-end tests in network namespaces (see tproxy_twist.lab).

Every test in tests/e2e is marked ``e2e``. They are skipped only when they
cannot run at all: not root, or ``ip`` / ``nft`` missing. CI runs as root with
both installed, so there they run.

Fixtures:

``lab``
    One :class:`~tproxy_twist.lab.Lab` per session, with the nftables rules
    for ``DivertPort(3129, (80,))`` applied in the router and the origin
    server listening on port 80 (diverted) and 8080 (not diverted).
``proxy``
    ``proxy(config_toml) -> ProxyProcess``: runs ``twistd -n tproxy`` in the
    router namespace and waits until every configured port listens.
``client_python``
    ``client_python(code) -> str``: ``python -c code`` in the client
    namespace; returns stdout, fails the test on a non-zero exit.
``curl``
    ``curl(*args) -> CompletedProcess``: curl in the client namespace, with
    ``--max-time 10`` unless the arguments say otherwise (later ones win).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tproxy_twist.lab import Lab, cleanup_stale, listen_ports
from tproxy_twist.rules import DivertPort, render_nftables

HERE = Path(__file__).resolve().parent

# The tproxy port the session lab's rules divert port 80 to.
TPROXY_PORT = 3129
DIVERTED_PORT = 80
DIRECT_PORT = 8080


def _why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, veth, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"e2e tests need {' and '.join(missing)} on PATH (apt: iproute2, nftables)"
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` selection looks at the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_not_runnable()
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    cleanup_stale()
    # A run stopped with SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so
    # this fixture's teardown still removes the lab's namespaces.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    the_lab = Lab()
    try:
        the_lab.setup()
        the_lab.apply_rules(render_nftables([DivertPort(TPROXY_PORT, (DIVERTED_PORT,))]))
        the_lab.start_origin((DIVERTED_PORT, DIRECT_PORT))
        yield the_lab
    finally:
        the_lab.teardown()


class ProxyProcess:
    """A running ``twistd -n tproxy`` in the router namespace."""

    def __init__(
        self, lab: Lab, popen: subprocess.Popen, config_path: Path, log_path: Path
    ) -> None:
        self.lab = lab
        self.popen = popen
        self.config_path = config_path
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait_log(self, text: str, timeout: float = 10) -> str:
        """Wait until ``text`` appears in the log; return the log. Fails the test otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if text in log:
                return log
            time.sleep(0.05)
        pytest.fail(f"{text!r} not in the proxy's log after {timeout}s:\n{self.log_text()}")

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM the master; SIGKILL its whole process group after ``grace`` seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Workers left behind by a master that died or hung: same process group.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode


@pytest.fixture
def proxy(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start ``twistd -n tproxy --config FILE`` in the router namespace.

    Readiness is judged with ``ss`` (a LISTEN socket on every configured port)
    rather than by connecting: a probe connection would show up in the
    proxy's metrics and, on a tproxy port, count as a rejected loop.
    """
    started: list[ProxyProcess] = []

    def start(
        config_toml: str,
        *,
        wait: bool = True,
        timeout: float = 60,
        extra_args: tuple[str, ...] = (),
    ) -> ProxyProcess:
        """Start the proxy; with ``wait``, return once every configured port listens.

        ``wait=False`` returns at once (for configurations meant to fail).
        ``extra_args`` go after ``--config FILE`` on the tproxy command line.
        """
        ports = listen_ports(config_toml) if wait else []
        busy = [p for p in ports if lab.listening(lab.router, p)]
        if busy:
            pytest.fail(
                f"port(s) {busy} already listening in the router namespace: "
                "an earlier test left a listener behind"
            )
        index = len(started)
        config_path = tmp_path / f"proxy{index}.toml"
        config_path.write_text(config_toml)
        log_path = tmp_path / f"proxy{index}.log"
        run_dir = Path(tempfile.mkdtemp(prefix=f"proxy{index}-", dir=tmp_path))
        try:
            popen = lab.start_proxy(
                config_path,
                log_path,
                ports=ports,
                extra_args=extra_args,
                pidfile=run_dir / "twistd.pid",
                timeout=timeout,
            )
        except RuntimeError as e:
            pytest.fail(f"the proxy {e}")
        process = ProxyProcess(lab, popen, config_path, log_path)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()
            lab.stop_process(process.popen, grace=1)


@pytest.fixture
def client_python(lab: Lab) -> Callable[..., str]:
    def run(code: str, timeout: float = 60) -> str:
        proc = lab.run(lab.client, [sys.executable, "-c", code], check=False, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(
                f"python in the client namespace exited with {proc.returncode}:\n"
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout.decode()

    return run


@pytest.fixture
def curl(lab: Lab) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return lab.run(
            lab.client,
            ["curl", "--silent", "--show-error", "--max-time", "10", *args],
            check=False,
            timeout=timeout,
        )

    return run
