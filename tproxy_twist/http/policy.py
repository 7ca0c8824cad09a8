"""
Relay policy as pure functions: who may use a port, where a request goes,
whether its Host agrees with where it goes, and what its head looks like
upstream.  No transport, clock or metric in here; L{session} calls these and
turns a refusal into an answer.

Each function either returns its decision or raises L{ProtocolError} with
the status and text the client should get.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Container

from ..config import PortConfig
from ..sockets import unmap
from . import headers as H
from .framing import Headers, ProtocolError, Request, Response
from .target import parse_authority, split_absolute

__all__ = [
    "Refusal",
    "admission",
    "authority_of",
    "host_agrees",
    "is_loop",
    "route",
    "trimmed_head",
    "trimmed_response_head",
    "unchanged_head",
    "unchanged_response_head",
    "upstream_fields",
    "wants_upgrade",
    "x_forwarded_for",
]


class Refusal(ProtocolError):
    """A refusal by policy: C{reason} is the metric reason (forbidden, loop)."""

    def __init__(self, status: int, text: str, reason: str) -> None:
        super().__init__(status, text)
        self.metric_reason = reason


def admission(
    port: PortConfig,
    client_ip: str,
    destination: tuple[str, int] | None,
    local_addresses: Container[str],
) -> Refusal | None:
    """
    Whether a new connection may be served: C{None}, or the L{Refusal} every
    request on it gets.  C{destination} is the original destination (C{None}
    on forward ports, or when an intercept port found none).
    """
    if not port.allows_everyone and not port.allows(client_ip):
        return Refusal(403, "access denied: your address may not use this proxy", "forbidden")
    mode = port.mode
    if mode == "intercept" and destination is None:
        return Refusal(
            403, "this port only serves NAT-intercepted traffic (no original destination)", "loop"
        )
    if destination is not None and destination[0] in local_addresses:
        return Refusal(
            403,
            f"direct connections to this {mode} port are refused: it only serves"
            " intercepted traffic (relaying would loop)",
            "loop",
        )
    return None


def is_loop(request: Request, via_marker: bytes) -> bool:
    """Whether the request already passed through us (our own Via entry is on it)."""
    vias = request.get_all(b"via")
    return bool(vias) and via_marker in b",".join(vias)


def authority_of(destination: tuple[str, int]) -> bytes:
    """A Host value naming C{destination}: C{b"203.0.113.2"}, C{b"[2001:db8::2]:8080"}."""
    ip, port = destination
    host = (f"[{ip}]" if ":" in ip else ip).encode()
    if port != 80:
        host += b":%d" % port
    return host


def route(
    port: PortConfig, request: Request, destination: tuple[str, int] | None
) -> tuple[tuple[str, int], bytes, bytes | None]:
    """
    Where C{request} goes: (destination, target to send, Host to send or
    C{None} to keep the request's own).

    On tproxy and intercept ports the original C{destination} decides,
    whatever the request names (CVE-2009-0801); an absolute-form target only
    replaces Host (RFC 9112 3.2.2).  On forward ports the absolute URL, or
    CONNECT's authority, decides.  An HTTP/1.0 request without Host gets one
    (from the original destination, or the URL): nothing goes upstream as
    HTTP/1.1 without Host.
    """
    target = request.target
    if port.mode != "forward":
        if request.method == b"CONNECT":
            raise Refusal(405, f"CONNECT is not allowed on a {port.mode} port", "bad_request")
        assert destination is not None
        if target[0] == 47 or target == b"*":  # origin-form or asterisk-form
            # (The framing lets only HTTP/1.0 requests go without Host.)
            if request.version == b"HTTP/1.0" and request.get(b"host") is None:
                return destination, target, authority_of(destination)
            return destination, target, None
        scheme, authority, path = split_absolute(target)
        if scheme != b"http":
            raise ProtocolError(400, f"{_text(scheme)}:// URLs cannot be relayed on this port")
        parse_authority(authority, 80)  # validated as strictly as Host
        return destination, path, authority
    if request.method == b"CONNECT":
        host, connect_port = parse_authority(target, None)
        if connect_port not in port.connect_ports:
            raise Refusal(403, f"CONNECT to port {connect_port} is not allowed", "forbidden")
        return (host, connect_port), target, None
    if target[0] == 47:
        raise ProtocolError(
            400, "this is a forward proxy port: requests need an absolute URL (http://host/path)"
        )
    scheme, authority, path = split_absolute(target)
    if scheme != b"http":
        raise ProtocolError(501, f"{_text(scheme)}:// URLs need CONNECT")
    return parse_authority(authority, 80), path, authority


def host_agrees(named: bytes, destination: tuple[str, int]) -> bool:
    """
    Whether the authority C{named} (the Host really sent upstream) agrees
    with the original C{destination}: same port, and the same address when
    it is an IP literal.  Host names cannot be checked without DNS, so they
    agree.  An invalid authority raises L{ProtocolError} (400).
    """
    if len(named) <= _CACHED_AUTHORITY:
        # Every new connection of a client asks again with the same Host.
        return _host_agrees_cached(named, destination)
    return _host_agrees(named, destination)


# Answers for authorities up to this long are remembered (at most 4096 of them).
_CACHED_AUTHORITY = 255


def _host_agrees(named: bytes, destination: tuple[str, int]) -> bool:
    host, port = parse_authority(named, 80)
    dest_host, dest_port = destination
    return port == dest_port and (not _is_ip_literal(host) or unmap(host) == dest_host)


_host_agrees_cached = functools.lru_cache(maxsize=4096)(_host_agrees)


def host_names_server(named: bytes, server_name: str, destination: tuple[str, int]) -> bool:
    """
    On a bumped connection: whether the authority C{named} names
    C{server_name} (the name the origin was verified for: the SNI, or the
    destination's address) or the destination's address, on the
    destination's port (443 when C{named} has none).  An invalid authority
    raises L{ProtocolError} (400).
    """
    host, port = parse_authority(named, 443)
    dest_host, dest_port = destination
    if port != dest_port:
        return False
    if _is_ip_literal(host):
        return unmap(host) in (dest_host, server_name)
    return host.removesuffix(".") == server_name


def wants_upgrade(request: Request) -> bool:
    """An HTTP/1.1 request asking to switch protocols (HTTP/1.0 has no Upgrade: RFC 9110 7.8)."""
    return (
        request.version == b"HTTP/1.1"
        and request.get(b"upgrade") is not None
        and b"upgrade" in H.connection_tokens(request.headers)
    )


def upstream_fields(
    request: Request,
    *,
    host: bytes | None,
    upgrade: bool,
    via: bytes | None,
    xff_mode: str,
    client_ip: str,
) -> Headers:
    """The fields of C{request} as sent upstream (without framing fields of a chunked body)."""
    fields = H.strip_hop_by_hop(request.headers, keep_upgrade=upgrade)
    if host is not None:
        fields = [(n, v) for n, v in fields if n.lower() != b"host"]
        fields.insert(0, (b"Host", host))
    if via is not None:  # None: this port adds no Via
        fields = H.add_via(fields, via)
    if xff_mode != "off":
        fields = x_forwarded_for(fields, xff_mode, client_ip)
    return fields


def unchanged_head(
    request: Request, *, via: bytes | None, xff_mode: str, client_ip: str
) -> bytes | None:
    """
    The head to send upstream for C{request} taken as received, with only
    our Via entry (and, with C{xff_mode} C{append}, X-Forwarded-For) added at
    the end, or C{None} when it needs the field-by-field rewrite of
    L{upstream_fields}.  When not C{None}, it is byte for byte what
    L{upstream_fields} and L{headers.serialize_request_head} make.

    The caller makes sure that the target and Host stay as received (an
    origin-form request that L{route} leaves alone).  Taken as received: an
    HTTP/1.1 request whose head the reader did not change and found
    C{plain}: no field that is rewritten or dropped (hop-by-hop fields,
    Connection, Proxy-*, Via, X-Forwarded-For), and every field line in the
    form C{name: value}.
    """
    head = request.head
    if head is None or not request.plain or request.version != b"HTTP/1.1":
        return None
    return _request_head_out(head, via, xff_mode, client_ip)


def unchanged_response_head(response: Response, via: bytes | None) -> bytes | None:
    """
    The head of C{response} as received, with only our Via entry added at the
    end, or C{None} when it needs the field-by-field rewrite.  When not
    C{None}, it is byte for byte what stripping the hop-by-hop fields, adding
    Via and L{headers.serialize_response_head} make.

    The caller makes sure that nothing else is to be added (no
    Transfer-Encoding, no Connection field: a final HTTP/1.1 response with a
    known length to an HTTP/1.1 client whose connection stays open).  Taken
    as received: an HTTP/1.1 response whose head the reader did not change,
    with a status line of version, code and a reason after a space, no field
    that is rewritten or dropped, and every field line in the form
    C{name: value} (C{plain}).
    """
    head = response.head
    if (
        head is None
        or not response.plain
        or response.version != b"HTTP/1.1"
        or head[12:13] != b" "  # b"HTTP/1.1 200 OK": serialized with the space even if empty
    ):
        return None
    return _response_head_out(head, via)


def forwarded_head(
    request: Request, via: bytes | None, xff_mode: str, client_ip: str
) -> bytes | None:
    """
    L{unchanged_head} or else L{trimmed_head}, in one call: the head to
    send upstream for C{request} as received (perhaps without its Connection
    fields), or C{None} for the field-by-field rewrite.  (Positional
    arguments: the session calls it for every request.)
    """
    head = request.head
    if head is None or request.version != b"HTTP/1.1":
        return None
    if not request.plain:
        if not request.trim:
            return None
        head = request.without_connection_fields()
    if via is not None:
        head += b"\r\nVia: " + via
    if xff_mode == "append":
        head += b"\r\nX-Forwarded-For: " + client_ip.encode()
    return head + b"\r\n\r\n"


def forwarded_response_head(
    response: Response, via: bytes | None, closing: bool = False
) -> bytes | None:
    """
    L{unchanged_response_head} or else L{trimmed_response_head}, in one call
    (the same conditions on the caller).  C{closing}: the client's connection
    closes after this response (it asked to, with C{Connection: close}, as a
    new connection per request does): C{Connection: close} goes after the
    received fields, before Via, byte for byte what the field-by-field
    rewrite adds.
    """
    head = response.head
    if head is None or response.version != b"HTTP/1.1" or head[12:13] != b" ":
        return None
    if not response.plain:
        if not response.trim:
            return None
        head = response.without_connection_fields()
    if closing:
        head += b"\r\nConnection: close"
    if via is not None:
        return head + b"\r\nVia: " + via + b"\r\n\r\n"
    return head + b"\r\n\r\n"


def _request_head_out(head: bytes, via: bytes | None, xff_mode: str, client_ip: str) -> bytes:
    """A request head's fields as they go on, plus Via and X-Forwarded-For, and its end."""
    if via is not None:
        head += b"\r\nVia: " + via
    if xff_mode == "append":
        head += b"\r\nX-Forwarded-For: " + client_ip.encode()
    return head + b"\r\n\r\n"


def _response_head_out(head: bytes, via: bytes | None) -> bytes:
    """A response head's fields as they go on, plus Via, and its end."""
    if via is not None:
        return head + b"\r\nVia: " + via + b"\r\n\r\n"
    return head + b"\r\n\r\n"


def trimmed_head(
    request: Request, *, via: bytes | None, xff_mode: str, client_ip: str
) -> bytes | None:
    """
    As L{unchanged_head}, for a request that is plain but for its
    Connection, Keep-Alive or Proxy-Connection fields (C{trim}: browsers
    send C{Connection: keep-alive}): the head as received without those
    lines, with Via (and X-Forwarded-For) added; or C{None}.  When not
    C{None}, it is byte for byte what L{upstream_fields} and
    L{headers.serialize_request_head} make.
    """
    if request.head is None or not request.trim or request.version != b"HTTP/1.1":
        return None
    return _request_head_out(request.without_connection_fields(), via, xff_mode, client_ip)


def trimmed_response_head(response: Response, via: bytes | None) -> bytes | None:
    """
    As L{unchanged_response_head}, for a response that is plain but for its
    Connection, Keep-Alive or Proxy-Connection fields (C{trim}: nginx sends
    C{Connection: keep-alive}): the head as received without those lines,
    with Via added; or C{None}.
    """
    head = response.head
    if head is None or not response.trim or response.version != b"HTTP/1.1" or head[12:13] != b" ":
        return None
    return _response_head_out(response.without_connection_fields(), via)


def x_forwarded_for(fields: Headers, mode: str, client_ip: str) -> Headers:
    """C{strip}: remove X-Forwarded-For; C{append}: add the client's address to it."""
    kept = [(n, v) for n, v in fields if n.lower() != b"x-forwarded-for"]
    if mode == "strip":
        return kept
    previous = [v for n, v in fields if n.lower() == b"x-forwarded-for"]
    kept.append((b"X-Forwarded-For", b", ".join([*previous, client_ip.encode()])))
    return kept


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")
