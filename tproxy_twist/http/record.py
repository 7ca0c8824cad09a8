"""
One record per finished exchange (a request and its answer, or a tunnel),
made by the session when the exchange ends and consumed afterwards by the
metrics and the access log.  Neither is called from inside the session.
"""

from __future__ import annotations

from ..accesslog import AccessEntry, AccessLog
from ..metrics import PortMetrics
from .framing import Response

__all__ = ["ExchangeRecord", "RecordSink", "absolute_url"]


class ExchangeRecord:
    """
    What one exchange was and how it ended.

    C{status} is 0 when no answer could be sent.  C{incomplete} names why a
    response that had started was cut off (C{upstream}: the origin closed or
    sent garbage mid-body; C{drain}: the drain timeout; C{timeout}: the idle
    timeout; C{client}: the client left), or is C{None}.
    """

    __slots__ = (
        "started",
        "finished",
        "client",
        "method",
        "request_target",
        "request_host",
        "target",
        "host",
        "destination",
        "status",
        "response_started",
        "tunnel",
        "denied",
        "response",
        "bytes_in",
        "bytes_out",
        "rejected",
        "upstream_error",
        "host_mismatch",
        "connect_duration",
        "incomplete",
        "scheme",
        "user",
    )

    def __init__(self, started: float, client: str, method: bytes, request_target: bytes) -> None:
        self.started = started
        self.finished = started
        self.client = client
        self.method = method
        self.request_target = request_target  # as the client sent it
        self.request_host: bytes | None = None  # the request's Host field
        self.target: bytes | None = None  # what was sent upstream (None: CONNECT, or refused)
        self.host: bytes | None = None  # a Host the proxy sent instead of the request's
        self.destination: tuple[str, int] | None = None
        self.status = 0
        self.response_started = False  # a response from upstream began to reach the client
        self.tunnel = False
        self.denied = False  # refused by policy (403, loops): Squid's TCP_DENIED
        # The final response relayed from upstream (None: none), for content_type.
        self.response: Response | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected: str | None = None  # tproxy_rejected_total reason
        self.upstream_error: str | None = None  # tproxy_upstream_errors_total reason
        self.host_mismatch = False
        self.connect_duration: float | None = None
        self.incomplete: str | None = None
        self.scheme = b"http"  # b"https": a request relayed inside a bumped TLS connection
        self.user: str | None = None  # the proxy-authenticated user (never a metric label)

    @property
    def content_type(self) -> bytes:
        """The relayed response's Content-Type (C{-}: none); looked up only when asked
        (the access log asks, metrics do not)."""
        response = self.response
        if response is None:
            return b"-"
        return response.get(b"content-type") or b"-"

    @property
    def duration(self) -> float:
        return self.finished - self.started

    @property
    def result(self) -> str:
        """Squid's result code; C{_ABORTED} is appended when the response was cut off."""
        if self.denied:
            result = "TCP_DENIED"
        elif self.tunnel and self.status in (101, 200):
            result = "TCP_TUNNEL"
        elif self.status and self.response_started:
            result = "TCP_MISS"
        else:
            result = "NONE"  # answered by the proxy itself, or not at all
        if self.incomplete is not None:
            result += "_ABORTED"
        return result

    def url(self) -> bytes:
        """The URL for the access log: Squid logs absolute URLs (CONNECT: the authority)."""
        if self.target is None:  # CONNECT, or answered before routing
            target = self.request_target
            if target.startswith(b"/") and self.request_host is not None:
                return self.scheme + b"://" + self.request_host + target
            return target
        return absolute_url(
            self.destination, self.target, self.host or self.request_host, self.scheme
        )


def absolute_url(
    destination: tuple[str, int] | None,
    target: bytes,
    host: bytes | None,
    scheme: bytes = b"http",
) -> bytes:
    """C{http://host/path} (or C{https://}) for an origin-form C{target}; others as they are."""
    if target.startswith(b"/") or target == b"*":
        if host is None and destination is not None:
            ip, port = destination
            host = (f"[{ip}]" if ":" in ip else ip).encode()
            if port != (443 if scheme == b"https" else 80):
                host += b":%d" % port
        return scheme + b"://" + (host or b"-") + target
    return target


class RecordSink:
    """Hands each finished exchange to the port's metrics and the access log."""

    __slots__ = ("metrics", "access_log", "port", "mode")

    def __init__(
        self, metrics: PortMetrics, access_log: AccessLog | None, port: str, mode: str
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.port = port
        self.mode = mode

    def __call__(self, record: ExchangeRecord) -> None:
        metrics = self.metrics
        metrics.exchange(
            record.method,
            record.status,
            record.finished - record.started,
            record.bytes_in,
            record.bytes_out,
        )
        if record.rejected is not None:
            metrics.rejected(record.rejected)
        if record.upstream_error is not None:
            metrics.upstream_error(record.upstream_error)
        if record.host_mismatch:
            metrics.host_mismatch.inc()
        if record.connect_duration is not None:
            metrics.connect_duration.observe(record.connect_duration)
        if record.incomplete is not None:
            metrics.incomplete(record.incomplete)
        if self.access_log is not None:
            self.access_log.log(self.entry(record))

    def entry(self, record: ExchangeRecord) -> AccessEntry:
        destination = record.destination
        if destination is None or not record.response_started:
            where = None
        elif ":" in destination[0]:
            where = f"[{destination[0]}]:{destination[1]}"
        else:
            where = f"{destination[0]}:{destination[1]}"
        return AccessEntry(
            time=record.finished,
            duration=record.finished - record.started,
            client=record.client,
            port=self.port,
            mode=self.mode,
            method=record.method.decode("ascii", "replace"),
            url=record.url().decode("ascii", "replace"),
            status=record.status,
            bytes_out=record.bytes_out,
            bytes_in=record.bytes_in,
            destination=where,
            result=record.result,
            content_type=record.content_type.decode("ascii", "replace"),
            user=record.user,
        )
