"""
The access log: one entry per request, handed over by the relay when the
request is finished (answered by the origin or by the proxy itself).
"""

from __future__ import annotations

from typing import Protocol

import attrs


@attrs.define(slots=True)
class AccessEntry:
    """What the relay knows about one finished request."""

    time: float  # when it finished, Unix seconds
    duration: float  # seconds from its head to the end of its answer
    client: str  # the client's IP address
    port: str  # the configured port's name
    mode: str  # tproxy, forward or intercept
    method: str
    url: str  # absolute: http://host/path, or host:port for CONNECT
    status: int  # 0 when no answer could be sent (the client went away first)
    bytes_out: int  # bytes sent to the client for this request, head included
    bytes_in: int  # bytes received from the client for this request
    destination: str | None  # "ip:port" (or "[ip]:port") the upstream connection went to
    result: str  # Squid's result code: TCP_MISS, TCP_TUNNEL, TCP_DENIED, NONE
    content_type: str  # of the answer, "-" when none


class AccessLog(Protocol):
    def log(self, entry: AccessEntry) -> None: ...
