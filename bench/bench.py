"""Side-by-side benchmark: direct routing, HAProxy, Squid and tproxy-twist, through TPROXY.

Usage (as root, from the checkout): ``bench/run [--only NAMES] [--quick] [--json FILE]``.
See bench/README.md for what each column means and how it is measured.

One run builds the three-namespace lab (client ── router ── origin), starts
nginx as the origin, then measures each path in turn (never two at once),
each with its own rules in the router, and prints one table. Every process
and namespace it creates is removed again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .contenders import CONTENDERS, DEFAULT_CONTENDERS, Contender, fd_limit
from .lab import SMALL_BODY, SMALL_PATH, BenchLab
from .measure import (
    LATENCY_CONNECTIONS,
    LATENCY_DELAY_MS,
    download,
    fetch_headers,
    idle_memory,
    wrk,
)
from .quiet import OtherLoad

# program -> Debian packages that provide it, preferred first
_PACKAGES = {
    "nginx": ["nginx-light", "nginx"],
    "squid": ["squid"],
    "haproxy": ["haproxy"],
    "wrk": ["wrk"],
    "curl": ["curl"],
    "nft": ["nftables"],
    "ip": ["iproute2"],
    "ss": ["iproute2"],
}
# Processes outside the benchmark using more than this share of all CPUs during
# a path's measurements make its figures untrustworthy: the report says so.
BUSY_SHARE = 0.05
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class VerificationError(RuntimeError):
    """The traffic did not (provably) go through the path's proxy."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- set-up ---------------------------------------------------------------------


def ensure_packages(contenders: list[Contender]) -> None:
    """apt-get install whatever program the selected paths need and is missing."""
    programs = ["nginx", "wrk", "curl", "nft", "ip", "ss"]
    programs += [b for c in contenders for b in c.binaries]
    missing = [p for p in dict.fromkeys(programs) if shutil.which(p, path=_SBIN_PATH) is None]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say(f"installing Debian packages for: {', '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=True)
    wanted = []
    for program in missing:
        for package in _PACKAGES[program]:
            shown = subprocess.run(
                ["apt-cache", "show", package], capture_output=True, timeout=60, check=False
            )
            if shown.returncode == 0 and shown.stdout.strip():
                wanted.append(package)
                break
        else:
            raise RuntimeError(f"no Debian package provides {program} ({_PACKAGES[program]})")
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *dict.fromkeys(wanted)],
        env=env,
        timeout=900,
        check=True,
    )


def raise_fd_limit(want: int = 262144) -> int:
    """Raise the open-file limit that every child inherits; return the new soft limit.

    Raising the hard limit needs CAP_SYS_RESOURCE; without it, the soft limit
    goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_quiet(limit: float, window: float = 3.0) -> None:
    """Wait (up to ``limit`` seconds) for a ``window`` in which others use < BUSY_SHARE."""
    deadline = time.monotonic() + limit
    while True:
        others = OtherLoad(())
        others.start()
        time.sleep(window)
        share = others.stop()["share"]
        if share <= BUSY_SHARE:
            return
        if time.monotonic() > deadline:
            say(f"the machine is still busy ({share:.0%} of all CPUs); measuring anyway")
            return
        say(f"waiting for a quiet machine: other processes use {share:.0%} of all CPUs")


# -- one path ---------------------------------------------------------------------


def verify(lab: BenchLab, contender: Contender, base: str, timeout: float = 10) -> None:
    """Fail unless a request to ``base`` provably went through ``contender``.

    The response must be the origin's (body, and the origin saw the client's own
    address) and carry the proxy's mark; retried for ``timeout`` seconds, since a
    proxy may be listening before all its workers serve.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, headers, body = fetch_headers(lab, base + SMALL_PATH)
            saw = ", ".join(headers.get("x-origin-saw-client", []))
            if status != 200 or body != SMALL_BODY:
                why = f"status {status}, body {body[:100]!r}"
            elif saw != lab.CLIENT4:
                why = f"the origin saw {saw!r}, not the client's address {lab.CLIENT4}"
            else:
                why = contender.check_response(headers)
        except RuntimeError as e:
            why = str(e)
        if why is None:
            return
        if time.monotonic() > deadline:
            raise VerificationError(f"{contender.name}: not verified: {why}")
        time.sleep(0.25)


def measure(lab: BenchLab, contender: Contender, opts: argparse.Namespace) -> dict:
    """Start the path, prove it, measure it, stop it. Never leaves it running."""
    base = f"http://{lab.ORIGIN4}" if contender.diverted else f"http://{lab.ORIGIN4}:8080"
    small = base + SMALL_PATH
    result: dict = {"name": contender.name, "version": contender.version(), "url": small}
    others = OtherLoad(lab.namespaces)
    others.start()
    try:
        say(f"[{contender.name}] starting")
        contender.start(lab)
        if contender.diverted:
            lab.divert_to_proxy()
        verify(lab, contender, base)
        counted_before = contender.relayed_requests(lab)
        sent = 1  # the verifying request

        say(f"[{contender.name}] keep-alive: wrk -t2 -c64, {opts.duration}s")
        warm = wrk(lab, small, seconds=opts.warmup)
        ka = wrk(lab, small, seconds=opts.duration)
        say(f"[{contender.name}] new connection per request, {opts.duration}s")
        close = wrk(lab, small, seconds=opts.duration, close=True)
        say(f"[{contender.name}] latency at a fixed rate, {opts.duration}s")
        lat = wrk(
            lab,
            small,
            seconds=opts.duration,
            threads=1,
            connections=LATENCY_CONNECTIONS,
            paced=True,
        )
        say(f"[{contender.name}] 100 MB downloads x{opts.downloads}")
        dl = download(lab, base, opts.downloads)
        result.update(keepalive=ka, close=close, latency=lat, download=dl, warmup=warm)
        sent += sum(r["requests"] for r in (warm, ka, close, lat)) + opts.downloads

        counted_after = contender.relayed_requests(lab)
        if counted_before is not None and counted_after is not None:
            counted = counted_after - counted_before
            result["proxy_counted_requests"] = counted
            result["client_completed_requests"] = sent
            if counted < 0.99 * sent:
                raise VerificationError(
                    f"{contender.name}: its own counters show {counted} requests, but the "
                    f"clients completed {sent}: traffic went around the proxy"
                )
        verify(lab, contender, base)

        if opts.idle and contender.worker_pids(lab):
            count = opts.idle
            limit = contender.max_idle()
            if limit is not None and limit - 50 < count:
                count = limit - 50
                result.setdefault("notes", []).append(
                    f"holds at most {limit} connections under the open-file limit of "
                    f"{fd_limit()} (one process, 2 descriptors per connection): memory "
                    f"measured with {count} idle connections, scaled linearly to {opts.idle}"
                )
            say(f"[{contender.name}] {count} idle keep-alive connections")
            mem = idle_memory(lab, contender, lab.ORIGIN4, count, opts.idle)
            result["idle"] = mem
            opened = mem["opened"]["open"]
            if opened < count or mem["established_on_proxy"] < 0.99 * count:
                result.setdefault("notes", []).append(
                    f"only {opened} of {count} idle connections opened "
                    f"({mem['established_on_proxy']} established in the router; "
                    f"errors {mem['opened']['errors']})"
                )
        for name, run in (("keep-alive", ka), ("new-connection", close), ("latency", lat)):
            if run["errors"] > 0.001 * max(run["requests"], 1):
                result.setdefault("notes", []).append(
                    f"{name}: {run['errors']} wrk errors in {run['requests']} requests "
                    f"(connect {run['connect_errors']}, read {run['read_errors']}, write "
                    f"{run['write_errors']}, status {run['status_errors']}, "
                    f"timeout {run['timeouts']})"
                )
        result["ok"] = True
    except Exception as e:  # one path failing must not stop the others
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        say(f"\n!!! {contender.name} FAILED: {result['error']}\n")
        if contender.log is not None and contender.log.exists():
            tail = contender.log.read_text(errors="replace").splitlines()[-20:]
            say("    its output ends with:\n    " + "\n    ".join(tail))
    finally:
        lab.remove_rules()
        contender.stop(lab)
        result["other_processes"] = load = others.stop()
        if load["share"] > BUSY_SHARE:
            result.setdefault("notes", []).append(
                f"the machine was busy: processes outside the benchmark used "
                f"{load['cpu_seconds']:.0f} CPU-seconds in these {load['seconds']:.0f}s "
                f"({load['share']:.0%} of all CPUs): these figures are skewed"
            )
    return result


# -- the table ---------------------------------------------------------------------


def _metrics(result: dict, direct: dict | None) -> dict[str, float | None]:
    if not result.get("ok"):
        return {}
    m: dict[str, float | None] = {
        "keepalive": result["keepalive"]["rps"],
        "close": result["close"]["rps"],
        "mb_s": result["download"]["median_mb_s"],
        "p50": result["latency"]["p50_us"] / 1000,
        "p99": result["latency"]["p99_us"] / 1000,
        "mem": result["idle"]["per_worker_mb"] if "idle" in result else None,
        "added_p50": None,
        "added_p99": None,
    }
    if direct and direct.get("ok"):
        m["added_p50"] = m["p50"] - direct["latency"]["p50_us"] / 1000
        m["added_p99"] = m["p99"] - direct["latency"]["p99_us"] / 1000
    return m


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:.2f}x"


def render_table(results: list[dict], idle: int) -> tuple[str, dict]:
    """The one table, and the ratios it shows (for the JSON file)."""
    by_name = {r["name"]: r for r in results}
    direct = by_name.get("direct")
    headers = [
        "path",
        "keep-alive req/s",
        "new-conn req/s",
        "100 MB MB/s",
        "p50 ms (added)",
        "p99 ms (added)",
        f"MB/worker @{idle // 1000}k idle" if idle >= 1000 else f"MB/worker @{idle} idle",
    ]
    rows = []
    metrics = {r["name"]: _metrics(r, direct) for r in results}
    for r in results:
        m = metrics[r["name"]]
        if not m:
            rows.append([r["name"], "FAILED", "", "", "", "", ""])
            continue

        def lat(key: str, m: dict = m, is_direct: bool = r["name"] == "direct") -> str:
            added = m[f"added_{key}"]
            text = f"{m[key]:.2f}"
            if added is not None and not is_direct:
                text += f" ({added:+.2f})"
            return text

        rows.append(
            [
                r["name"],
                f"{m['keepalive']:,.0f}",
                f"{m['close']:,.0f}",
                f"{m['mb_s']:,.0f}",
                lat("p50"),
                lat("p99"),
                "-" if m["mem"] is None else f"{m['mem']:.1f}",
            ]
        )
    ratios: dict = {}
    ours = metrics.get("tproxy-twist") or {}
    if ours:
        for other in ("squid", "haproxy", "direct"):
            theirs = metrics.get(other) or {}
            if not theirs:
                continue
            row = {
                "keepalive": _ratio(ours["keepalive"], theirs["keepalive"]),
                "close": _ratio(ours["close"], theirs["close"]),
                "mb_s": _ratio(ours["mb_s"], theirs["mb_s"]),
                # Latency: ratio of the latency each proxy ADDS to the direct path.
                "added_p50": "-"
                if other == "direct"
                else _ratio(ours["added_p50"], theirs["added_p50"]),
                "added_p99": "-"
                if other == "direct"
                else _ratio(ours["added_p99"], theirs["added_p99"]),
                "mem": "-" if other == "direct" else _ratio(ours["mem"], theirs["mem"]),
            }
            ratios[f"tproxy-twist / {other}"] = row
            rows.append(
                [
                    f"tproxy-twist / {other}",
                    row["keepalive"],
                    row["close"],
                    row["mb_s"],
                    row["added_p50"],
                    row["added_p99"],
                    row["mem"],
                ]
            )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), ratios


def render_targets(results: list[dict], idle: int) -> str:
    """The issue's targets, each with the figure from this run."""
    by_name = {r["name"]: r for r in results}
    direct = by_name.get("direct")
    m = {name: _metrics(r, direct) for name, r in by_name.items()}
    ours = m.get("tproxy-twist") or {}
    if not ours:
        return ""
    return render_target_lines(
        "targets (ratios from this run):", numeric_ratios(results), ours.get("mem"), idle
    )


#: The issue's targets: (ratio key, other path, wanted, at least (True) or at most).
TARGETS = (
    ("keepalive", "squid", 1.5, True),
    ("keepalive", "haproxy", 0.5, True),
    ("close", "squid", 2.0, True),
    ("close", "haproxy", 0.8, True),
    ("mb_s", "direct", 0.8, True),
    ("added_p99", "haproxy", 1.0, False),
)
_TARGET_LABELS = {
    "keepalive": "keep-alive req/s",
    "close": "new-connection req/s",
    "mb_s": "100 MB MB/s",
    "added_p99": "added p99 latency",
}
MEMORY_TARGET_MB = 40.0


def numeric_ratios(results: list[dict]) -> dict[str, float]:
    """tproxy-twist's figures over each other path's, as numbers: C{"keepalive/squid": 1.6}."""
    by_name = {r["name"]: r for r in results}
    direct = by_name.get("direct")
    m = {name: _metrics(r, direct) for name, r in by_name.items()}
    ours = m.get("tproxy-twist") or {}
    ratios: dict[str, float] = {}
    if not ours:
        return ratios
    for other in ("squid", "haproxy", "direct"):
        theirs = m.get(other) or {}
        for key in ("keepalive", "close", "mb_s", "added_p50", "added_p99", "mem"):
            a, b = ours.get(key), theirs.get(key)
            if a is not None and b is not None and b > 0:
                ratios[f"{key}/{other}"] = a / b
    return ratios


def render_target_lines(title: str, ratios: dict[str, float], mem: float | None, idle: int) -> str:
    lines = [title]

    def check(label: str, value: float | None, ok: bool) -> None:
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"  {'met ' if ok else 'MISS'}  {label}: {shown}")

    for key, other, want, at_least in TARGETS:
        value = ratios.get(f"{key}/{other}")
        label = f"{_TARGET_LABELS[key]} {'>=' if at_least else '<='} {want} x {other}"
        if value is None:
            continue  # that path was not run (or failed: the table says so)
        check(label, value, value >= want if at_least else value <= want)
    if mem is not None and idle == 10_000:
        check(
            f"MB per worker with 10,000 idle connections <= {MEMORY_TARGET_MB:g}",
            mem,
            mem <= MEMORY_TARGET_MB,
        )
    return "\n".join(lines)


def summarize_rounds(rounds: list[list[dict]]) -> dict[str, dict[str, float]]:
    """Each ratio's median, min and max over the rounds (each round's ratios are within it)."""
    per_round = [numeric_ratios(results) for results in rounds]
    keys = sorted({k for ratios in per_round for k in ratios})
    summary = {}
    for key in keys:
        values = [ratios[key] for ratios in per_round if key in ratios]
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "values": values,
        }
    return summary


def render_repeat(summary: dict[str, dict[str, float]], rounds: int) -> str:
    """The ratio table of a --repeat run: median (min-max) of each ratio."""
    columns = [
        ("keepalive", "keep-alive"),
        ("close", "new-conn"),
        ("mb_s", "100 MB"),
        ("added_p50", "added p50"),
        ("added_p99", "added p99"),
        ("mem", "memory"),
    ]
    headers = [f"median (min-max) of {rounds} rounds"] + [c[1] for c in columns]
    rows = []
    for other in ("squid", "haproxy", "direct"):
        row = [f"tproxy-twist / {other}"]
        for key, _ in columns:
            item = summary.get(f"{key}/{other}")
            if item is None:
                row.append("-")
            elif len(item["values"]) == 1:
                row.append(f"{item['median']:.2f}x")
            else:
                row.append(f"{item['median']:.2f}x ({item['min']:.2f}-{item['max']:.2f})")
        if any(c != "-" for c in row[1:]):
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure direct routing, HAProxy, Squid and tproxy-twist through TPROXY.",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated paths to run, in this order, of {', '.join(CONTENDERS)}"
        f" (default: {','.join(DEFAULT_CONTENDERS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 s per wrk run, 1 s warm-up, 2 downloads"
    )
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--idle",
        type=int,
        default=10_000,
        help="idle keep-alive connections for the memory column (0: skip; default 10000)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="measure every path N times, interleaved (all paths, then all again); report"
        " each ratio's median and spread, and judge the targets on the median",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPUs alone",
    )
    opts = parser.parse_args(argv)
    names = [n.strip() for n in opts.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if opts.repeat < 1:
        parser.error("--repeat: at least 1")
    if unknown or not names:
        parser.error(f"--only: unknown path(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    opts.names = names
    if opts.duration is None:
        opts.duration = 3.0 if opts.quick else 10.0
    opts.warmup = 1.0 if opts.quick else 2.0
    opts.downloads = 2 if opts.quick else 7
    return opts


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, timeout=10, check=False)
        .stderr.decode()
        .strip(),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        say("bench/run: run as root (network namespaces, TPROXY)")
        return 2
    # SIGTERM (a timeout, a CI stop) must still run the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    contenders = [CONTENDERS[name]() for name in opts.names]
    ensure_packages(contenders)
    opts.fd_limit = raise_fd_limit()
    if opts.wait_quiet:
        wait_quiet(opts.wait_quiet)
    started = time.monotonic()
    rounds: list[list[dict]] = []
    lab = BenchLab()
    idle = opts.idle
    try:
        say(f"building the lab {lab.prefix} (client, router, origin namespaces)")
        lab.setup()
        lab.start_nginx()
        for number in range(opts.repeat):
            if opts.repeat > 1:
                say(f"--- round {number + 1} of {opts.repeat}")
            rounds.append([measure(lab, contender, opts) for contender in contenders])
            for contender in contenders:
                # The next round starts each path in a fresh directory.
                if contender.dir is not None and contender.dir.exists():
                    contender.dir.rename(contender.dir.with_name(f"{contender.name}-{number + 1}"))
            # The idle-connection memory is measured in the first round only.
            opts.idle = 0
    finally:
        opts.idle = idle
        lab.teardown()
    results = rounds[0]
    table, ratios = render_table(results, opts.idle)
    targets = render_targets(results, opts.idle)
    summary = summarize_rounds(rounds) if opts.repeat > 1 else None
    if summary is not None:
        ours = next((r for r in results if r["name"] == "tproxy-twist" and r.get("ok")), None)
        mem = ours["idle"]["per_worker_mb"] if ours and "idle" in ours else None
        targets = render_target_lines(
            f"targets (the median ratio of {opts.repeat} rounds; memory from round 1):",
            {key: item["median"] for key, item in summary.items()},
            mem,
            opts.idle,
        )
    machine = _machine()
    print()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}: {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"Python {machine['python']}, origin {machine['nginx'].removeprefix('nginx version: ')}, "
        f"open-file limit {opts.fd_limit}; wrk runs of {opts.duration:g}s; "
        f"{time.monotonic() - started:.0f}s in all"
    )
    for r in results:
        if r.get("version"):
            print(f"  {r['name']}: {r['version']}")
    print()
    if summary is not None:
        print(f"round 1 of {opts.repeat}:")
    print(table)
    if summary is not None:
        print()
        print(render_repeat(summary, opts.repeat))
    rates = [f"{r['name']} {r['latency']['rps']:,.0f}" for r in results if r.get("ok")]
    if rates:
        print(
            f"latency columns: wrk -t1 -c{LATENCY_CONNECTIONS}, each connection pausing "
            f"{LATENCY_DELAY_MS} ms after every response; achieved req/s: {', '.join(rates)}"
        )
    if targets:
        print()
        print(targets)
    everything = [r for results_ in rounds for r in results_]
    failed = [r for r in everything if not r.get("ok")]
    notes = [f"{r['name']}: {n}" for r in everything for n in r.get("notes", [])]
    notes += [f"{r['name']}: FAILED: {r['error']}" for r in failed]
    if notes:
        print()
        print("notes:")
        for note in notes:
            print(f"  - {note}")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "options": {
                        "only": opts.names,
                        "duration": opts.duration,
                        "warmup": opts.warmup,
                        "downloads": opts.downloads,
                        "idle": opts.idle,
                        "repeat": opts.repeat,
                        "fd_limit": opts.fd_limit,
                        "latency": {
                            "connections": LATENCY_CONNECTIONS,
                            "delay_ms": LATENCY_DELAY_MS,
                        },
                    },
                    "results": results,
                    "ratios": ratios,
                    "table": table,
                    "rounds": rounds,
                    "ratio_summary": summary,
                    "targets": targets,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
