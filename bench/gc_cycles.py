"""
What a closed connection leaves to the cyclic GC, per kind of connection,
through the worker's real objects on loopback: the objects only a
collection would free (reference cycles), and with C{--cycles} the cycles
themselves (the strongly connected components among them, each object's
references inside its cycle by attribute name).

    PYTHONPATH=. .venv/bin/python -m bench.gc_cycles [--cycles] [KIND ...]

Kinds: C{plain} (two keep-alive requests, tproxy port), C{forward} (the
same through a forward port), C{connect} (a CONNECT tunnel: zero-copy),
C{bump-new}, C{bump-keepalive}, C{splice} (a TLS port's zero-copy splice);
C{--twisted-splice}: the splice's upstream through Twisted's connector.

The set-up is L{bench.bump_cpu}'s (nginx the origin, the proxy's ports in
this process on the worker reactor), curl the client.  After a warm-up,
each kind runs twice with the cyclic GC off and C{gc.DEBUG_SAVEALL}, then
one collection: what it finds is printed by type.  Zero objects: the
connections were freed by reference counting alone.
"""

from __future__ import annotations

import argparse
import collections
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bump_cpu as B

reactor = B.reactor

from tproxy_twist import config as C  # noqa: E402
from tproxy_twist.http.relay import ProxyFactory, RelaySettings  # noqa: E402
from tproxy_twist.metrics import PortMetrics  # noqa: E402
from tproxy_twist.sockets import connect_upstream, open_upstream  # noqa: E402
from tproxy_twist.tls.layer import tls_factory  # noqa: E402

EXTRA_PORTS = """
[[port]]
name = "fwd"
listen = "127.0.0.1:3"
mode = "forward"

[[port]]
name = "splice"
listen = "127.0.0.1:4"
mode = "tproxy"
protocol = "tls"
[port.tls]
default = "splice"
"""
# Forward ports refuse loopback destinations: clients name this one, and the
# connector sends it to nginx (port 80: plain HTTP, 443: HTTPS).
NAMED = "192.0.2.1"


def _label(o: object) -> str:
    kind = type(o)
    if kind.__name__ == "method":
        return f"method {type(o.__self__).__name__}.{o.__func__.__name__}"
    if kind.__name__ == "function":
        return f"function {o.__qualname__}"
    if kind.__name__ == "cell":
        return f"cell({type(o.cell_contents).__name__})"
    return kind.__qualname__


def _attribute(o: object, target: object) -> str:
    """The name under which C{o} refers to C{target}, if one is found."""
    if isinstance(o, dict):
        for key, value in o.items():
            if value is target:
                return f"[{key!r}]"
        return "?"
    for cls in type(o).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            try:
                if getattr(o, slot) is target:
                    return slot
            except AttributeError:
                pass
    return "?"


def print_cycles(objects: list) -> None:
    """The strongly connected components of C{objects}' references (Tarjan's)."""
    ids = {id(o): o for o in objects}
    edges = {i: [id(r) for r in gc.get_referents(o) if id(r) in ids] for i, o in ids.items()}
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    components: list[list[int]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(ids) + 1000))

    def visit(v: int) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(component)

    for v in ids:
        if v not in index:
            visit(v)
    shapes: dict[tuple[str, ...], list[list[int]]] = collections.defaultdict(list)
    for component in components:
        shapes[tuple(sorted(_label(ids[i]) for i in component))].append(component)
    for shape, found in shapes.items():
        print(f"   cycle x{len(found)} ({len(shape)} objects):")
        members = set(found[0])
        for i in found[0]:
            o = ids[i]
            inside = [
                f"{_attribute(o, r)}->{_label(r)}" for r in gc.get_referents(o) if id(r) in members
            ]
            print(f"      {_label(o)}: {', '.join(inside)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_cycles")
    parser.add_argument("kinds", nargs="*")
    parser.add_argument("--cycles", action="store_true", help="print the cycles themselves")
    parser.add_argument(
        "--twisted-splice",
        action="store_true",
        help="the splice's upstream through Twisted's connector, not a raw socket",
    )
    opts = parser.parse_args(argv)
    if shutil.which("curl") is None or shutil.which("nginx") is None:
        print("needs curl and nginx", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gc_cycles."))
    nginx = None
    try:
        nginx, https, http, config = B.setup(tmp)
        config = C.loads(B.CONFIG.format(tmp=tmp) + EXTRA_PORTS, str(tmp / "bench.toml"))
        plain = B.listen_plain(config, http)
        bump = B.listen_bump(config, https)
        worker_connect = connect_upstream(reactor)

        def to_nginx(host, port, factory, timeout, source_ip):
            return worker_connect(
                "127.0.0.1", https if port == 443 else http, factory, timeout, None
            )

        port = config.ports[2]
        forward = ProxyFactory(
            port,
            settings=RelaySettings(config.timeouts, config.limits, "bench"),
            connect=to_nginx,
            clock=reactor,
            local_addresses=frozenset(),
            metrics=PortMetrics(port.name, port.mode),
            reactor=reactor,
        )
        fwd = reactor.listenTCP(0, forward, interface="127.0.0.1").getHost().port
        splicing = tls_factory(
            config.ports[3], config, reactor, B.to(https), frozenset(), None, None
        )
        splicing.open_upstream = (
            None
            if opts.twisted_splice
            else lambda host, port, source: open_upstream("127.0.0.1", https, None)
        )
        splice = reactor.listenTCP(0, splicing, interface="127.0.0.1").getHost().port
        origin_ca = str(tmp / "origin-ca.pem")
        proxy_ca = str(tmp / "proxy-ca" / "ca.pem")
        kinds = {
            "plain": [f"http://localhost:{plain}/small"] * 2,
            "forward": ["-x", f"http://127.0.0.1:{fwd}"] + [f"http://{NAMED}/small"] * 2,
            "connect": ["-p", "-x", f"http://127.0.0.1:{fwd}", "-k", f"https://{NAMED}/small"],
            "bump-new": ["--cacert", proxy_ca, f"https://localhost:{bump}/small"],
            "bump-keepalive": ["--cacert", proxy_ca] + [f"https://localhost:{bump}/small"] * 2,
            "splice": ["--cacert", origin_ca, f"https://localhost:{splice}/small"],
        }
        unknown = set(opts.kinds) - set(kinds)
        if unknown:
            parser.error(f"unknown kinds: {', '.join(sorted(unknown))} (of {', '.join(kinds)})")

        def curl(args: list[str]) -> None:
            client = subprocess.Popen(["curl", "-sS", *args], stdout=subprocess.DEVNULL)
            while client.poll() is None:
                B.serve(0.02)
            settle = time.monotonic() + 0.3  # the proxy's side of the close
            while time.monotonic() < settle:
                B.serve(0.02)

        for args in kinds.values():  # warm-up: leaves, sessions, code paths
            curl(args)
        for name in opts.kinds or list(kinds):
            gc.collect()
            gc.garbage.clear()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                curl(kinds[name])
                curl(kinds[name])
                gc.collect()
            finally:
                gc.set_debug(0)
                gc.enable()
            counts = collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
            )
            print(f"== {name}: {len(gc.garbage)} objects left to the cyclic GC by 2 connections")
            for kind, n in counts.most_common():
                print(f"  {n:4d} {kind}")
            if opts.cycles:
                print_cycles(gc.garbage)
            gc.garbage.clear()
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
