"""
C{/status} and C{/status.json} on the master's metrics listener.  Only
clients in C{[metrics] status_allow} get them (others: 403 with the reason).
Building the document reads what the board sampled; nothing here touches
the workers.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable

from twisted.web.resource import Resource

from .page import render


def _client_allowed(request, allowed: tuple) -> bool:
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed)


class StatusResource(Resource):
    """C{/status} (HTML) or C{/status.json}, for the document C{source()} returns."""

    isLeaf = True

    def __init__(self, source: Callable[[], dict], allowed: Callable[[], tuple], as_json: bool):
        super().__init__()
        self._source = source
        self._allowed = allowed
        self._json = as_json

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if not _client_allowed(request, self._allowed()):
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            host = getattr(request.getClientAddress(), "host", "?")
            return f"403 Forbidden: {host} is not in [metrics] status_allow\n".encode()
        doc = self._source()
        if self._json:
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(doc, indent=1).encode() + b"\n"
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        # The page has no script and loads nothing from elsewhere; say so to the browser.
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'none'; style-src 'unsafe-inline'; img-src data:",
        )
        return render(doc).encode()

    render_HEAD = render_GET
