"""How fast the master notices and repairs worker failures, measured (root only).

    .venv/bin/python -m bench.process_life [--rounds N]

The end-to-end tests assert that these things happen, with generous bounds
(a loaded machine may be slow); this reports how long they take.  In the
three-namespace lab, with ``workers = 3`` and ``heartbeat_grace = 5``:

- ``respawn``: SIGKILL a worker → a replacement listens on the tproxy port;
- ``stop_noticed``: SIGSTOP a worker → ``/healthz`` answers 503;
- ``stop_replaced``: SIGSTOP a worker → a replacement listens (the grace included);
- ``reload``: SIGHUP → the log says the new generation is ready and serving.

Prints one JSON object: for each, the median, minimum and maximum seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import time

from tproxy_twist.lab import Lab
from tproxy_twist.rules import DivertPort, render_nftables

CONFIG = """\
workers = 3
heartbeat_grace = 5

[metrics]
listen = "127.0.0.1:9464"

[[port]]
name = "transparent"
listen = "[::]:3129"
mode = "tproxy"
"""


def _listeners(lab: Lab) -> set[int]:
    out = lab.run(lab.router, ["ss", "-Hltnp", "sport", "=", ":3129"]).stdout.decode()
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def _replaced(lab: Lab, victim: int) -> bool:
    pids = _listeners(lab)
    return len(pids) == 3 and victim not in pids


def _healthz(lab: Lab) -> int:
    out = lab.run(
        lab.router,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
         "http://127.0.0.1:9464/healthz"],
        check=False,
    ).stdout  # fmt: skip
    return int(out or 0)


def _until(condition, timeout: float = 60.0, step: float = 0.01) -> float:
    """Seconds until C{condition()} is true (polled every C{step})."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


def _settled(lab: Lab) -> set[int]:
    _until(lambda: len(_listeners(lab)) == 3 and _healthz(lab) == 200, step=0.1)
    return _listeners(lab)


def measure(rounds: int) -> dict[str, dict[str, float]]:
    figures: dict[str, list[float]] = {
        "respawn": [], "stop_noticed": [], "stop_replaced": [], "reload": []
    }  # fmt: skip
    with Lab() as lab:
        lab.apply_rules(render_nftables([DivertPort(3129, (80,))]))
        lab.start_origin((80,))
        assert lab.tmpdir is not None
        config = lab.tmpdir / "tproxy.toml"
        config.write_text(CONFIG)
        log = lab.tmpdir / "proxy.log"
        proxy = lab.start_proxy(config, log, ports=(3129, 9464))
        try:
            for _ in range(rounds):
                victim = min(_settled(lab))
                os.kill(victim, signal.SIGKILL)
                figures["respawn"].append(_until(lambda v=victim: _replaced(lab, v)))
                victim = min(_settled(lab))
                os.kill(victim, signal.SIGSTOP)
                start = time.monotonic()
                _until(lambda: _healthz(lab) == 503)
                figures["stop_noticed"].append(time.monotonic() - start)
                _until(lambda v=victim: _replaced(lab, v))
                figures["stop_replaced"].append(time.monotonic() - start)
                _settled(lab)
                served = log.read_text().count("ready and serving")
                proxy.send_signal(signal.SIGHUP)
                figures["reload"].append(
                    _until(lambda n=served: log.read_text().count("ready and serving") > n)
                )
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proxy.pid, signal.SIGKILL)
    return {
        name: {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }
        for name, values in figures.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.process_life")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps({"rounds": args.rounds, "seconds": measure(args.rounds)}, indent=2))


if __name__ == "__main__":
    main()
