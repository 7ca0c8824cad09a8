"""
Every metric the proxy exports, defined once.

Label values are bounded: the configured port name, its mode, a fixed set
of methods (anything else is C{other}), status codes, and fixed reasons.
The relay talks to L{PortMetrics}, which pre-binds label children so that
counting a request costs a dict lookup and a few increments.
"""

from __future__ import annotations

import bisect
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values

if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    # In multiprocess mode every increment checks os.getpid() (a system call)
    # in case the process forked.  Ours never fork after this point (workers
    # are fresh interpreters), so the pid is read once.
    _PID = os.getpid()
    values.ValueClass = values.MultiProcessValue(lambda: _PID)

# Sub-millisecond to tens of seconds: a proxy's own overhead, LAN origins,
# slow origins and long downloads all land in distinct buckets.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class PortFamilies:
    """
    The per-port metric families, registered on one C{CollectorRegistry}:
    the process-wide default for the proxy, a registry of their own for
    tests (so tests stop sharing global state).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tproxy_requests",
            "HTTP requests answered, by port, mode, method and status code "
            "(including answers made by the proxy itself).",
            ["port", "mode", "method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "tproxy_request_duration_seconds",
            "Time from a request's head to the end of its response.",
            ["port"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_connect_duration = Histogram(
            "tproxy_upstream_connect_duration_seconds",
            "Time to establish the upstream TCP connection.",
            ["port"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "tproxy_bytes",
            "Bytes received from clients (in) and sent to clients (out).",
            ["port", "direction"],
            registry=registry,
        )
        self.connections = Counter(
            "tproxy_connections", "Client connections accepted.", ["port"], registry=registry
        )
        self.connections_active = Gauge(
            "tproxy_connections_active",
            "Client connections open now.",
            ["port"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "tproxy_upstream_errors",
            "Upstream connections or exchanges that failed, by reason.",
            ["port", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "tproxy_rejected",
            "Requests the proxy refused to relay, by reason.",
            ["port", "reason"],
            registry=registry,
        )
        self.host_mismatch = Counter(
            "tproxy_host_mismatch",
            "Requests on intercepting ports whose Host names another IP address or port than"
            " the original destination (relayed to the original destination, or 409 under"
            " host_verify_strict).",
            ["port"],
            registry=registry,
        )
        self.responses_incomplete = Counter(
            "tproxy_responses_incomplete",
            "Responses cut off after they had begun to reach the client, by reason: upstream"
            " (the origin closed or broke the message), drain (the drain timeout), timeout"
            " (the idle timeout), client (the client left).",
            ["port", "reason"],
            registry=registry,
        )
        self.accept_paused = Counter(
            "tproxy_accept_paused",
            "Times a port stopped accepting for half a second because accept() failed for"
            " want of resources, by errno: EMFILE (the worker's open-files limit), ENFILE (the"
            " system's), ENOBUFS, ENOMEM.  New connections wait in the kernel's queue meanwhile.",
            ["port", "reason"],
            registry=registry,
        )


_DEFAULT = PortFamilies(REGISTRY)
REQUESTS = _DEFAULT.requests
REQUEST_DURATION = _DEFAULT.request_duration
UPSTREAM_CONNECT_DURATION = _DEFAULT.upstream_connect_duration
BYTES = _DEFAULT.bytes
CONNECTIONS = _DEFAULT.connections
CONNECTIONS_ACTIVE = _DEFAULT.connections_active
UPSTREAM_ERRORS = _DEFAULT.upstream_errors
REJECTED = _DEFAULT.rejected
HOST_MISMATCH = _DEFAULT.host_mismatch
RESPONSES_INCOMPLETE = _DEFAULT.responses_incomplete
ACCEPT_PAUSED = _DEFAULT.accept_paused
_FAMILIES: dict[int, PortFamilies] = {id(REGISTRY): _DEFAULT}


def families(registry: CollectorRegistry | None = None) -> PortFamilies:
    """The per-port families on C{registry} (the default registry when C{None}), made once."""
    if registry is None:
        return _DEFAULT
    found = _FAMILIES.get(id(registry))
    if found is None or found.registry is not registry:
        found = _FAMILIES[id(registry)] = PortFamilies(registry)
    return found


WORKERS = Gauge("tproxy_workers", "Worker processes ready to serve.", multiprocess_mode="max")
WORKER_RESTARTS = Counter("tproxy_worker_restarts", "Workers replaced after they exited.")

# --- TLS bump: leaf certificates, origin verification, clients that refuse us ---------

TLS_LEAF_CACHE = Counter(
    "tproxy_tls_leaf_cache",
    "Forged leaf certificate lookups in a worker's cache: hit, miss (a leaf was signed)"
    " or eviction (the least recently used leaf was dropped to stay within leaf_cache_size).",
    ["result"],
)
TLS_LEAF_CACHE_ENTRIES = Gauge(
    "tproxy_tls_leaf_cache_entries",
    "Forged leaf certificates held in the workers' caches.",
    multiprocess_mode="livesum",
)
TLS_ORIGIN_VERIFY = Counter(
    "tproxy_tls_origin_verify",
    "Origin TLS handshakes before a bump, by result: ok, or why the origin was not trusted"
    " (bad_name, unknown_issuer, expired, untrusted, handshake_failed, timeout).",
    ["port", "result"],
)
TLS_CLIENT_CERT_REJECTED = Counter(
    "tproxy_tls_client_cert_rejected",
    "Bumped handshakes the client ended by refusing the proxy's certificate (no CA"
    " installed, or a pinned application).",
    ["port"],
)
LEAF_CACHE_RESULTS = ("hit", "miss", "eviction")
ORIGIN_VERIFY_RESULTS = (
    "ok", "bad_name", "unknown_issuer", "expired", "untrusted", "handshake_failed", "timeout",
)  # fmt: skip


class LeafCacheMetrics:
    """What a worker's leaf cache reports (see L{tproxy_twist.tls.leaf.LeafCache})."""

    def __init__(self) -> None:
        self._hit = TLS_LEAF_CACHE.labels("hit")
        self._miss = TLS_LEAF_CACHE.labels("miss")
        self._eviction = TLS_LEAF_CACHE.labels("eviction")
        self._entries = TLS_LEAF_CACHE_ENTRIES

    def hit(self) -> None:
        self._hit.inc()

    def miss(self) -> None:
        self._miss.inc()

    def evicted(self) -> None:
        self._eviction.inc()

    def size(self, entries: int) -> None:
        self._entries.set(entries)


class BumpMetrics:
    """The bump series of one port, label children bound once."""

    def __init__(self, port: str) -> None:
        self._verify = {r: TLS_ORIGIN_VERIFY.labels(port, r) for r in ORIGIN_VERIFY_RESULTS}
        self._rejected = TLS_CLIENT_CERT_REJECTED.labels(port)

    def origin_verified(self, result: str) -> None:
        self._verify[result].inc()

    def client_rejected_certificate(self) -> None:
        self._rejected.inc()


class NullBumpMetrics:
    """L{BumpMetrics} that records nothing (metrics off)."""

    def __init__(self, port: str) -> None:
        pass

    def origin_verified(self, result: str) -> None:
        pass

    def client_rejected_certificate(self) -> None:
        pass


# --- end of TLS bump --------------------------------------------------------------------

# --- process life (the master and the workers' own upkeep) -------------------------------
WORKERS_NOT_READY = Gauge(
    "tproxy_workers_not_ready",
    "Workers of the serving generation that are not ready: starting, restarting, or silent"
    " (their heartbeat stopped: stopped, stuck in a loop or deadlocked).",
    multiprocess_mode="max",
)
ACCESS_LOG_DROPPED = Counter(
    "tproxy_access_log_dropped",
    "Access-log entries lost: the disk did not keep up (the queue was full), or the"
    " write failed (disk full, I/O error; the log says which).",
)

# --- TLS ports (tproxy_twist.tls); the SNI is never a label: it is unbounded ----------
TLS_CONNECTIONS = Counter(
    "tproxy_tls_connections",
    "Connections on TLS ports by what was done with them: splice, deny, bump (decrypted"
    " after the origin was verified), tunnel (not TLS, relayed as on_not_tls says) or close"
    " (no decision was possible, see tproxy_tls_rejected_total).",
    ["port", "action"],
)
TLS_REJECTED = Counter(
    "tproxy_tls_rejected",
    "Connections on TLS ports refused, by reason: denied (a rule or default), no_sni (the"
    " no-SNI action denied it), not_tls, timeout (no whole ClientHello within"
    " client_hello_timeout), too_large, malformed, origin_unverified (bump with"
    " on_verify_failure = terminate, and the origin failed verification).",
    ["port", "reason"],
)
TLS_ACTIONS = ("splice", "deny", "tunnel", "close", "bump")
TLS_REJECT_REASONS = (
    "denied", "no_sni", "not_tls", "timeout", "too_large", "malformed", "origin_unverified",
)  # fmt: skip


class TLSPortMetrics:
    """
    The TLS series of one port, label children bound once (all exist from
    the start).  Counts are added up in memory and handed over by L{flush},
    as L{PortMetrics} does with requests.
    """

    def __init__(self, port: str) -> None:
        self._children = {
            **{("action", a): TLS_CONNECTIONS.labels(port, a) for a in TLS_ACTIONS},
            **{("reason", r): TLS_REJECTED.labels(port, r) for r in TLS_REJECT_REASONS},
        }
        for child in self._children.values():
            child.inc(0)
        self._pending = dict.fromkeys(self._children, 0)
        self._any = False

    def action(self, action: str) -> None:
        self._pending[("action", action)] += 1
        self._any = True

    def rejected(self, reason: str) -> None:
        self._pending[("reason", reason)] += 1
        self._any = True

    def flush(self) -> None:
        if not self._any:
            return
        for key, count in self._pending.items():
            if count:
                self._children[key].inc(count)
                self._pending[key] = 0
        self._any = False


class NullTLSPortMetrics:
    """L{TLSPortMetrics} that records nothing (metrics off)."""

    def __init__(self, port: str) -> None:
        pass

    def action(self, action: str) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def flush(self) -> None:
        pass


# --- byte streams relayed unread (tproxy_twist.zerocopy) --------------------------------
STREAMS = Counter(
    "tproxy_streams",
    "Byte streams relayed without being read (TLS passthrough, CONNECT and Upgrade tunnels),"
    " by how: splice"
    " (zero-copy with splice(2); the worker only counts bytes) or copy (through the worker:"
    " one of the sockets did not allow splicing).",
    ["port", "how"],
)
STREAM_HOWS = ("splice", "copy")


class StreamMetrics:
    """
    How one port's byte streams are relayed; a stream starts at most once
    per connection.  Counted in plain numbers and handed to prometheus_client
    by L{flush} (the port's sweep), as L{PortMetrics} does with requests.
    """

    def __init__(self, port: str) -> None:
        self._children = {how: STREAMS.labels(port, how) for how in STREAM_HOWS}
        for child in self._children.values():
            child.inc(0)
        self._pending = dict.fromkeys(STREAM_HOWS, 0)
        self._any = False

    def started(self, how: str) -> None:
        self._pending[how] += 1
        self._any = True

    def flush(self) -> None:
        """Hand the streams started since the last flush to prometheus_client."""
        if not self._any:
            return
        self._any = False
        pending = self._pending
        for how, count in pending.items():
            if count:
                self._children[how].inc(count)
                pending[how] = 0


class NullStreamMetrics:
    """L{StreamMetrics} that records nothing (metrics off)."""

    def __init__(self, port: str) -> None:
        pass

    def started(self, how: str) -> None:
        pass

    def flush(self) -> None:
        pass


# --- the rest -----------------------------------------------------------------------

METHODS = frozenset(
    m.encode() for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                         "PATCH")
)  # fmt: skip
UPSTREAM_ERROR_REASONS = (
    "refused", "timeout", "unreachable", "spoof", "reset", "bad_response", "no_descriptors",
)  # fmt: skip
# destination: refused by the destination rules (the router itself, link-local,
# allow/deny_destinations); auth: proxy authentication missing or wrong (407).
REJECT_REASONS = (
    "bad_request", "forbidden", "loop", "limit", "timeout", "destination", "auth",
)  # fmt: skip
INCOMPLETE_REASONS = ("upstream", "drain", "timeout", "client")
#: Why a port paused accepting: the errno of the failed accept() (sockets.serve_accepts).
ACCEPT_PAUSE_REASONS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")


class PortMetrics:
    """
    The metrics of one listening port, label children bound once.

    The per-request counts (requests, their durations, bytes) are added up
    in plain Python numbers and handed to prometheus_client by L{flush},
    which the relay calls a few times a second: in multiprocess mode each
    prometheus_client update is a locked write to a memory-mapped file, and
    doing five of those per request cost about a sixth of a worker's
    throughput.  Scrapes see requests at most one flush interval late.
    """

    def __init__(self, port: str, mode: str, registry: CollectorRegistry | None = None) -> None:
        self.port = port
        self.mode = mode
        self.families = f = families(registry)
        self.connections = f.connections.labels(port)
        self.active = f.connections_active.labels(port)
        self.bytes_in = f.bytes.labels(port, "in")
        self.bytes_out = f.bytes.labels(port, "out")
        self.duration = f.request_duration.labels(port)
        # Observed per new upstream connection: added up, written at each flush.
        self.connect_duration = _PendingHistogram(f.upstream_connect_duration.labels(port))
        self.host_mismatch = f.host_mismatch.labels(port)
        self._requests: dict[tuple[bytes, int], Counter] = {}
        self._upstream_errors = {
            r: f.upstream_errors.labels(port, r) for r in UPSTREAM_ERROR_REASONS
        }
        self._rejected = {r: f.rejected.labels(port, r) for r in REJECT_REASONS}
        self._incomplete = {r: f.responses_incomplete.labels(port, r) for r in INCOMPLETE_REASONS}
        self._accept_paused = {r: f.accept_paused.labels(port, r) for r in ACCEPT_PAUSE_REASONS}
        # Children exist from the start, so every series shows 0 before the first event.
        self.bytes_in.inc(0)
        self.bytes_out.inc(0)
        self._pending_requests: dict[tuple[bytes, int], int] = {}
        self._pending_durations = _PendingHistogram(self.duration)
        self._pending_in = 0
        self._pending_out = 0

    def request(self, method: bytes, code: int, duration: float) -> None:
        key = (method, code)
        pending = self._pending_requests
        pending[key] = pending.get(key, 0) + 1
        self._pending_durations.observe(duration)

    def transferred(self, bytes_in: int, bytes_out: int) -> None:
        self._pending_in += bytes_in
        self._pending_out += bytes_out

    def exchange(
        self, method: bytes, code: int, duration: float, bytes_in: int, bytes_out: int
    ) -> None:
        """L{request} and L{transferred} in one call: what every finished exchange counts."""
        key = (method, code)
        pending = self._pending_requests
        pending[key] = pending.get(key, 0) + 1
        durations = self._pending_durations  # its observe(), inline
        durations._counts[bisect.bisect_left(durations._bounds, duration)] += 1
        durations._sum += duration
        durations._any = True
        self._pending_in += bytes_in
        self._pending_out += bytes_out

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus_client."""
        if self._pending_requests:
            pending, self._pending_requests = self._pending_requests, {}
            for (method, code), count in pending.items():
                self._request_child(method, code).inc(count)
        self._pending_durations.flush()
        self.connect_duration.flush()
        if self._pending_in:
            self.bytes_in.inc(self._pending_in)
            self._pending_in = 0
        if self._pending_out:
            self.bytes_out.inc(self._pending_out)
            self._pending_out = 0

    def _request_child(self, method: bytes, code: int) -> Counter:
        child = self._requests.get((method, code))
        if child is None:
            label = method.decode("ascii", "replace") if method in METHODS else "other"
            child = self.families.requests.labels(self.port, self.mode, label, str(code))
            self._requests[(method, code)] = child
        return child

    def upstream_error(self, reason: str) -> None:
        self._upstream_errors[reason].inc()

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def incomplete(self, reason: str) -> None:
        self._incomplete[reason].inc()

    def accept_paused(self, reason: str) -> None:
        """The port paused accepting: C{reason} is the errno's name (C{EMFILE})."""
        self._accept_paused[reason].inc()


class _PendingHistogram:
    """
    Observations added up per bucket, then written to a Histogram child in
    one go.  Uses the child's private _buckets (per-bucket, not cumulative)
    and _sum, exactly as Histogram.observe does; tests/unit/test_metrics.py
    checks the result against observe() itself.
    """

    __slots__ = ("_child", "_bounds", "_counts", "_sum", "_any")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._any = False

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        self._any = True

    def flush(self) -> None:
        if not self._any:
            return
        counts = self._counts
        for i, count in enumerate(counts):
            if count:
                self._child._buckets[i].inc(count)
                counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0
        self._any = False


class _Nothing:
    """A metric child that records nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class NullPortMetrics:
    """
    L{PortMetrics} for a proxy whose metrics nobody can read (`[metrics]
    listen = ""`): every call is a no-op.  Also what the benchmark compares
    against to show what metrics cost.
    """

    def __init__(self, port: str, mode: str, registry: CollectorRegistry | None = None) -> None:
        self.port = port
        self.mode = mode
        nothing = _Nothing()
        self.connections = self.active = self.bytes_in = self.bytes_out = nothing
        self.duration = self.connect_duration = self.host_mismatch = nothing

    def request(self, method: bytes, code: int, duration: float) -> None:
        pass

    def transferred(self, bytes_in: int, bytes_out: int) -> None:
        pass

    def exchange(
        self, method: bytes, code: int, duration: float, bytes_in: int, bytes_out: int
    ) -> None:
        pass

    def flush(self) -> None:
        pass

    def upstream_error(self, reason: str) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def incomplete(self, reason: str) -> None:
        pass

    def accept_paused(self, reason: str) -> None:
        pass
