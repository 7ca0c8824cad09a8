"""
C{tproxy-twist status}: the status page in a terminal.

It reads C{/status.json} from the master's metrics listener (the
configuration's C{[metrics] listen}, or C{--url}) and prints a compact
table: the master, one line per port, one per worker, the latest problems.
C{--watch} prints it again every few seconds until interrupted.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TextIO

from .status.document import SCHEMA

DEFAULT_URL = "http://127.0.0.1:9464/status.json"
#: Problems printed (the page shows all the master keeps).
PROBLEMS_SHOWN = 10
_CLEAR = "\x1b[H\x1b[2J"


def add_status_parser(commands, config_help: str, usage_error: type[Exception]) -> None:
    """Add the C{status} command to the C{tproxy-twist} parser."""
    status = commands.add_parser(
        "status",
        help="show what the running proxy is doing (from its /status.json)",
        description="Print the running proxy's status: per port the open connections,"
        " requests per second (10 s and 1 min), responses by class, bytes per second,"
        " rejections and upstream errors; per worker its pid, generation, uptime,"
        " connections, RSS and restarts; the latest problems. It reads /status.json on the"
        " metrics listener of the configuration ([metrics] listen), or --url.",
    )
    status.add_argument("--config", "-c", metavar="FILE", help=config_help)
    status.add_argument(
        "--url",
        help="the status document's URL, or the metrics listener's"
        f" (http://HOST:PORT; /status.json is added); default: from the configuration, else"
        f" {DEFAULT_URL}",
    )
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="print it again every SECONDS (default 2) until interrupted",
    )
    status.add_argument("--json", action="store_true", help="print the document as it came")
    status.set_defaults(run=lambda args, out: cmd_status(args, out, usage_error))


def status_url(args: argparse.Namespace, usage_error: type[Exception]) -> str:
    """Where to read the status document, from C{--url} or the configuration."""
    if args.url:
        url = args.url if "://" in args.url else "http://" + args.url
        scheme, _, rest = url.partition("://")
        if "/" not in rest or rest.endswith("/"):
            url = url.rstrip("/") + "/status.json"
        return url
    from . import config as configuration

    try:
        if args.config:
            config = configuration.load(args.config)
        else:
            config = configuration.load_default()
    except configuration.ConfigError as e:
        if args.config:
            raise usage_error(str(e)) from None
        return DEFAULT_URL  # no configuration here: the default listener
    listen = config.metrics_listen
    if listen is None:
        raise usage_error(
            f'{config.path}: [metrics] listen = "": the proxy serves no status; give --url'
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{listen.port}/status.json"


def fetch(url: str, timeout: float = 5.0) -> dict:
    """The status document at C{url}; raises L{OSError} or L{ValueError} with the reason."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    # A proxy from the environment must not stand between us and our own proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace").strip()
        raise OSError(f"HTTP {e.code}: {detail or e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(str(e.reason)) from None
    doc = json.loads(body)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a tproxy-twist status document (schema {SCHEMA})")
    return doc


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60}s"
    return f"{seconds}s"


def _table(head: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns sized to fit; the first C{left} columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return [line(head), *(line(r) for r in rows)]


def _reasons(table: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in table.items() if v) or "-"


def format_status(doc: dict, problems: int = PROBLEMS_SHOWN) -> str:
    """The status document C{doc} as the terminal table C{tproxy-twist status} prints."""
    m = doc["master"]
    reload = m["last_reload"]
    reload_text = "none" if reload is None else reload["result"]
    if reload is not None and reload.get("detail"):
        reload_text += f" ({reload['detail']})"
    failed = [p["name"] for p in m["probes"] if not p["ok"]]
    lines = [
        f"tproxy-twist {m['version']}  master pid {m['pid']}  up {_duration(m['uptime'])}"
        f"  workers {m['workers_ready']}/{m['workers_wanted']} ready  generation"
        f" {m['generation']}",
        f"config {m['config']}  last reload: {reload_text}"
        f"  probes: {'FAILED ' + ', '.join(failed) if failed else 'ok'}",
        "",
    ]
    rows = []
    for p in doc["ports"]:
        r = p["responses"]
        rows.append(
            [
                p["name"],
                p["mode"] + ("/tls" if p["protocol"] == "tls" else ""),
                p["listen"],
                str(p["connections_active"]),
                _rate(p["requests_per_second"]["10s"]),
                _rate(p["requests_per_second"]["1m"]),
                str(p["requests_total"]),
                f"{r['2xx']}/{r['3xx']}/{r['4xx']}/{r['5xx']}",
                _size(p["bytes_per_second"]["in"]) + "/s",
                _size(p["bytes_per_second"]["out"]) + "/s",
                _reasons({**p["rejected"], **p["upstream_errors"]}),
            ]
        )
    lines += _table(
        ["PORT", "MODE", "LISTEN", "CONNS", "REQ/S10s", "REQ/S1m", "REQUESTS",
         "2xx/3xx/4xx/5xx", "IN", "OUT", "REJECTED+ERRORS"],
        rows,
        left=3,
    )  # fmt: skip
    lines.append("")
    rows = [
        [
            str(w["index"]),
            str(w["pid"]),
            str(w["generation"]),
            w["state"],
            _duration(w["uptime"]),
            "-" if w["connections"] is None else str(w["connections"]),
            _size(w["rss_bytes"]),
            str(w["restarts"]),
        ]
        for w in doc["workers"]
    ]
    lines += _table(
        ["WORKER", "PID", "GEN", "STATE", "UPTIME", "CONNS", "RSS", "RESTARTS"], rows, left=0
    )
    shown = doc["problems"][:problems]
    lines.append("")
    if not shown:
        lines.append("no recent problems")
    else:
        lines.append(f"recent problems ({len(shown)} of {len(doc['problems'])}, newest first):")
        for p in shown:
            when = time.strftime("%H:%M:%S", time.localtime(p["time"]))
            lines.append(
                f"  {when} {p['port']} w{p['worker']} {p['client']} {p['method']}"
                f" {p['destination']} {p['kind']}:{p['reason']} -> {p['status'] or '-'}"
            )
    return "\n".join(lines) + "\n"


def cmd_status(
    args: argparse.Namespace,
    out: TextIO,
    usage_error: type[Exception],
    *,
    get: Callable[[str], dict] = fetch,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    url = status_url(args, usage_error)
    if args.watch is not None and args.watch <= 0:
        raise usage_error("tproxy-twist status: --watch needs a positive number of seconds")
    try:
        while True:
            status = _show(url, args, out, get)
            if args.watch is None:
                return status
            sleep(args.watch)
    except KeyboardInterrupt:  # how --watch ends
        return 0


def _show(url: str, args: argparse.Namespace, out: TextIO, get: Callable[[str], dict]) -> int:
    clear = "" if args.watch is None else _CLEAR
    try:
        doc = get(url)
    except (OSError, ValueError) as e:
        out.write(f"{clear}tproxy-twist status: cannot read {url}: {e}\n")
        out.flush()
        return 1
    text = json.dumps(doc, indent=1) + "\n" if args.json else format_status(doc)
    out.write(clear + text)
    out.flush()
    return 0
