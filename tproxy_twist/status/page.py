"""
The C{/status} page: the status document (L{document.build}) drawn as one
self-contained HTML page: inline CSS, inline SVG sparklines, no script, no
external asset.  It refreshes itself (C{<meta http-equiv="refresh">}).

Everything shown is escaped; it is drawn from the document alone, so the
page and C{/status.json} always say the same.
"""

from __future__ import annotations

import time
from html import escape

#: Seconds between two reloads of the page by the browser.
REFRESH = 5

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.2em;color:#1b1f23;background:#fafbfc}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.5em}
th,td{border:1px solid #d0d7de;padding:.25em .55em;text-align:right;white-space:nowrap}
th{background:#f0f3f6;font-weight:600}td.l,th.l{text-align:left}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:600}.warn{color:#9a6700}
.muted{color:#6e7781}svg{vertical-align:middle}
.meta span{margin-right:1.4em}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _bytes(value: float | int | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def sparkline(values: list[float], color: str, width: int = 120, height: int = 24) -> str:
    """An inline SVG polyline of C{values} (oldest first), scaled to its own maximum."""
    top = max(values, default=0.0)
    label = f"last {len(values)}s, peak {top:.1f}/s"
    if len(values) < 2:
        return (
            f'<svg class="spark" width="{width}" height="{height}" role="img"'
            f' aria-label="{_e(label)}"><title>{_e(label)}</title></svg>'
        )
    scale = (height - 2) / top if top > 0 else 0.0
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - v * scale:.1f}" for i, v in enumerate(values))
    return (
        f'<svg class="spark" width="{width}" height="{height}" role="img"'
        f' aria-label="{_e(label)}" viewBox="0 0 {width} {height}"><title>{_e(label)}</title>'
        f'<polyline fill="none" stroke="{color}" stroke-width="1.3" points="{points}"/></svg>'
    )


def _reasons(table: dict[str, int]) -> str:
    shown = [f"{_e(k)} {v:,}" for k, v in table.items() if v]
    return ", ".join(shown) if shown else '<span class="muted">none</span>'


def _ports(doc: dict) -> str:
    rows = []
    for p in doc["ports"]:
        rps, eps = p["requests_per_second"], p["errors_per_second"]
        r = p["responses"]
        tls = p["tls"]
        tls_cell = "-"
        if tls is not None:
            tls_cell = _reasons(tls["actions"])
            if any(tls["rejected"].values()):
                tls_cell += "<br>rejected: " + _reasons(tls["rejected"])
        rows.append(
            f'<tr class="port" data-port="{_e(p["name"])}">'
            f'<td class="l"><b>{_e(p["name"])}</b></td><td class="l">{_e(p["mode"])}'
            f"{' / tls' if p['protocol'] == 'tls' else ''}</td>"
            f'<td class="l">{_e(p["listen"])}</td>'
            f"<td>{_num(p['connections_active'])}</td>"
            f"<td>{_num(rps['10s'])}</td><td>{_num(rps['1m'])}</td>"
            f"<td>{_num(p['requests_total'])}</td>"
            f'<td class="{"bad" if eps["1m"] else ""}">{_num(eps["1m"], 2)}</td>'
            f"<td>{_num(r['2xx'])}</td><td>{_num(r['3xx'])}</td><td>{_num(r['4xx'])}</td>"
            f'<td class="{"bad" if r["5xx"] else ""}">{_num(r["5xx"])}</td>'
            f"<td>{_bytes(p['bytes_per_second']['in'])}/s</td>"
            f"<td>{_bytes(p['bytes_per_second']['out'])}/s</td>"
            f'<td class="l">{_reasons(p["rejected"])}</td>'
            f'<td class="l">{_reasons(p["upstream_errors"])}</td>'
            f'<td class="l">{tls_cell}</td>'
            f"<td>{sparkline(p['history']['requests_per_second'], '#0969da')}</td>"
            f"<td>{sparkline(p['history']['errors_per_second'], '#cf222e')}</td></tr>"
        )
    head = (
        '<tr><th class="l">port</th><th class="l">mode</th><th class="l">listen</th>'
        "<th>conns</th><th>req/s 10s</th><th>req/s 1m</th><th>requests</th><th>errors/s 1m</th>"
        "<th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th><th>in</th><th>out</th>"
        '<th class="l">rejected</th><th class="l">upstream errors</th><th class="l">TLS</th>'
        "<th>req/s, 10 min</th><th>errors/s, 10 min</th></tr>"
    )
    return f'<table id="ports">{head}{"".join(rows)}</table>'


def _workers(doc: dict) -> str:
    rows = []
    for w in doc["workers"]:
        state = w["state"]
        css = "ok" if state == "ready" else ("bad" if state == "silent" else "warn")
        rows.append(
            f'<tr class="worker" data-worker="{w["index"]}">'
            f"<td>{w['index']}</td><td>{_e(w['pid'])}</td><td>{w['generation']}</td>"
            f'<td class="l {css}">{_e(state)}</td><td>{_duration(w["uptime"])}</td>'
            f"<td>{_num(w['connections'])}</td><td>{_bytes(w['rss_bytes'])}</td>"
            f'<td>{w["restarts"]}</td><td class="l">{_e(w["last_error"]) or "-"}</td></tr>'
        )
    head = (
        '<tr><th>worker</th><th>pid</th><th>generation</th><th class="l">state</th>'
        "<th>uptime</th><th>conns</th><th>RSS</th><th>restarts</th>"
        '<th class="l">last error</th></tr>'
    )
    return f'<table id="workers">{head}{"".join(rows)}</table>'


def _master(doc: dict) -> str:
    m = doc["master"]
    reload = m["last_reload"]
    if reload is None:
        reload_text = '<span class="muted">none since start</span>'
    else:
        css = {"ok": "ok", "started": "warn"}.get(reload["result"], "bad")
        reload_text = (
            f'{_when(reload["time"])}: <span class="{css}">{_e(reload["result"])}</span>'
            + (f" ({_e(reload['detail'])})" if reload.get("detail") else "")
        )
    probes = "".join(
        f'<li><span class="{"ok" if p["ok"] else "bad"}">{"ok" if p["ok"] else "problem"}</span>'
        f" {_e(p['name'])}: {_e(p['detail'])}</li>"
        for p in m["probes"]
    )
    ready = m["workers_ready"] == m["workers_wanted"]
    return (
        '<div class="meta" id="master">'
        f"<span>tproxy-twist <b>{_e(m['version'])}</b></span>"
        f"<span>master pid {m['pid']}, up {_duration(m['uptime'])}</span>"
        f'<span class="{"ok" if ready else "bad"}">{m["workers_ready"]}/{m["workers_wanted"]}'
        f" workers ready</span><span>generation {m['generation']}</span></div>"
        f"<p>configuration <code>{_e(m['config'])}</code>, loaded {_when(m['config_loaded'])};"
        f" last reload: {reload_text}</p>"
        f"<p>start-up probes:</p><ul>{probes or '<li class=muted>none</li>'}</ul>"
    )


def _problems(doc: dict) -> str:
    problems = doc["problems"]
    if not problems:
        return '<p class="muted" id="problems">No upstream errors or rejections.</p>'
    rows = "".join(
        f'<tr><td class="l">{_when(p["time"])}</td><td class="l">{_e(p["port"])}</td>'
        f'<td>{p["worker"]}</td><td class="l">{_e(p["client"])}</td>'
        f'<td class="l">{_e(p["method"])}</td><td class="l">{_e(p["destination"])}</td>'
        f'<td class="l">{_e(p["kind"].replace("_", " "))}: {_e(p["reason"])}</td>'
        f"<td>{p['status'] or '-'}</td></tr>"
        for p in problems
    )
    head = (
        '<tr><th class="l">time</th><th class="l">port</th><th>worker</th>'
        '<th class="l">client</th><th class="l">method</th><th class="l">destination</th>'
        '<th class="l">problem</th><th>answered</th></tr>'
    )
    return f'<table id="problems">{head}{rows}</table>'


def render(doc: dict) -> str:
    """The whole page for the status document C{doc}."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tproxy-twist status</title><style>{_CSS}</style></head><body>"
        f"<h1>tproxy-twist status</h1>"
        f'<p class="muted">as of {_when(doc["time"])}; refreshes every {REFRESH}s;'
        ' the same as JSON: <a href="status.json">status.json</a>;'
        ' for Prometheus: <a href="metrics">metrics</a></p>'
        f"{_master(doc)}"
        f"<h2>Ports</h2>{_ports(doc)}"
        f"<h2>Workers</h2>{_workers(doc)}"
        f"<h2>Recent problems (last {len(doc['problems'])}, newest first)</h2>{_problems(doc)}"
        "</body></html>\n"
    )
