"""
What the pieces of a TLS bump cost in one worker, without a network:

- forging a leaf (a cache miss: sign with the CA, convert for OpenSSL);
- a cache hit;
- the server side of a bumped handshake over memory BIOs, leaf cached
  (the client side runs in the same process and is measured apart, then
  subtracted);
- the per-connection client options for the origin handshake: the shared
  context this project uses against C{optionsForClientTLS} per connection;
- the memory a cached leaf takes (RSS, so OpenSSL's own structures count).

    .venv/bin/python -m bench.tls_forge [--seconds S]

Timings belong here, not in tests: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import time
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet.task import Clock

from tproxy_twist.tls.ca import CertificateAuthority, create_ca
from tproxy_twist.tls.leaf import BumpServerTLS, LeafCache, forge_leaf
from tproxy_twist.tls.testing import memory_handshake
from tproxy_twist.tls.verify import OriginTrust, load_trust_root


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_call(function: Callable[[int], object], seconds: float) -> tuple[float, int]:
    """
    Microseconds of this process's CPU time per call of C{function(i)},
    called for about C{seconds} of CPU time.  CPU time rather than wall
    time: on a shared machine other processes' load would count otherwise.
    """
    calls = 0
    started = time.process_time()
    deadline = started + seconds
    while time.process_time() < deadline:
        for _ in range(50):
            function(calls)
            calls += 1
    return (time.process_time() - started) / calls * 1e6, calls


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_forge")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.UTC)
    key, certificate = create_ca("bench CA", now)
    ca = CertificateAuthority(certificate, key)
    clock = Clock()
    clock.advance(now.timestamp())
    rows: list[tuple[str, float, int]] = []

    leaf_key = LeafCache(ca, 1, clock)._key
    rows.append(
        ("forge_leaf (sign only)",)
        + per_call(lambda i: forge_leaf(ca, leaf_key, f"h{i}.example", now), args.seconds)
    )
    misses = LeafCache(ca, 1_000_000, clock)
    rows.append(
        ("cache miss (sign + convert + insert)",)
        + per_call(lambda i: misses.get(f"m{i}.example"), args.seconds)
    )
    hits = LeafCache(ca, 1000, clock)
    for i in range(1000):
        hits.get(f"h{i}.example")
    rows.append(
        ("cache hit (1000 hosts)",) + per_call(lambda i: hits.get(f"h{i % 1000}.example"), 1.0)
    )

    server = BumpServerTLS(hits)
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_alpn_protos([b"http/1.1"])

    def handshake(i: int) -> None:
        name = f"h{i % 1000}.example"
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        client.set_tlsext_host_name(name.encode())
        connection = server.creator(name).serverConnectionForTLS(None)
        connection.set_accept_state()
        errors = memory_handshake(client, connection)
        assert errors == (None, None), errors

    rows.append(("handshake pair, leaf cached (client + server)",) + per_call(handshake, 3.0))

    # The same handshake against a server context with one fixed certificate:
    # the difference is what the SNI callback and the cache lookup add.
    plain_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    plain_context.use_certificate(hits.get("h0.example"))
    plain_context.use_privatekey(hits.key)

    def plain_handshake(i: int) -> None:
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        client.set_tlsext_host_name(b"h0.example")
        connection = SSL.Connection(plain_context, None)
        connection.set_accept_state()
        errors = memory_handshake(client, connection)
        assert errors == (None, None), errors

    rows.append(("handshake pair, fixed certificate (no bump)",) + per_call(plain_handshake, 3.0))

    trust = load_trust_root(None)
    shared = OriginTrust(trust)
    rows.append(
        ("origin options, shared context",)
        + per_call(lambda i: shared.creator(f"h{i}.example"), 1.0)
    )
    per_connection = OriginTrust(trust, shared_context=False)

    def fresh(i: int) -> None:
        creator = per_connection.creator(f"h{i}.example")
        # The context is built on first use: make it.
        creator._createConnection.__self__.getContext()

    rows.append(("origin options, optionsForClientTLS per connection",) + per_call(fresh, 1.0))

    gc.collect()
    before = rss()
    sized = LeafCache(ca, 5000, clock)
    for i in range(5000):
        sized.get(f"s{i}.example")
    gc.collect()
    after = rss()

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'us CPU/call':>11}  {'calls':>7}")
    for name, micros, calls in rows:
        print(f"{name:<{width}}  {micros:>11.1f}  {calls:>7}")
    print(f"leaf cache memory: {(after - before) / 5000:.0f} bytes of RSS per leaf (5000 leaves)")


if __name__ == "__main__":
    main()
