"""Header policy for a relaying proxy, and serialization of heads and chunks.

Pure functions over ``Headers`` lists (``[(name, value), ...]``, names in their
original case).  Functions that change a header list return a new list and
leave their argument untouched.  Serializers trust their input: field names and
values must already be valid (as everything ``framing`` produced is); they do
not re-check for CR/LF.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from tproxy_twist.http.framing import HOP_BY_HOP as _HOP_BY_HOP
from tproxy_twist.http.framing import Headers

__all__ = [
    "HOP_BY_HOP",
    "add_via",
    "connection_tokens",
    "TRAILER_FIELDS",
    "encode_chunk",
    "forwardable_trailers",
    "last_chunk",
    "serialize_request_head",
    "serialize_response_head",
    "simple_response",
    "strip_hop_by_hop",
    "via_value",
]

HOP_BY_HOP: Final[frozenset[bytes]] = _HOP_BY_HOP
"""Fields that describe one connection and are never forwarded (RFC 9110 §7.6.1),
in either direction, on every port mode.  Proxy-Authorization and
Proxy-Authenticate are among them (RFC 9110 §11.7.1-2: they are for the proxy
that asks or is asked, not for the next hop).
"""

TRAILER_FIELDS: Final[frozenset[bytes]] = frozenset(
    {
        b"content-digest",
        b"repr-digest",
        b"digest",
        b"content-md5",
    }
)
"""The only request trailer fields forwarded upstream (lowercase).

A trailer arrives after the content, yet the next hop may merge it into the
header section (RFC 9110 §6.5.2 forbids that unless a field's definition
allows it, but not every server obeys).  A trailer field that frames, routes,
authenticates, controls or describes the message (Content-Length,
Transfer-Encoding, Host, Connection, TE, Trailer, Authorization, Proxy-*,
Cookie, Expect, Range, Max-Forwards, Cache-Control, Content-Type, ...;
RFC 9110 §6.5.1), or that the proxy manages (X-Forwarded-For, Via), could make
the origin act on something the proxy never checked.  So we allow only fields
whose definition permits the trailer section and that carry no such meaning:
integrity checksums (Content-Digest and Repr-Digest of RFC 9530, the older
Digest and Content-MD5).  Every other trailer field is dropped, as Squid drops
them all.
"""

_HOP_BY_HOP_LENGTHS: Final = frozenset(len(name) for name in HOP_BY_HOP)

# A Connection header cannot make us drop these: losing them would change how the
# next hop frames or routes the message ("Connection: content-length" smuggling).
_NEVER_NOMINATED: Final = frozenset({b"content-length", b"host"})

_CRLF: Final = b"\r\n"
_COLON_SP: Final = b": "


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lowercased connection options of all Connection fields."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            for item in value.split(b","):
                item = item.strip(b" \t")
                if item:
                    tokens.add(item.lower())
    return tokens


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    """Remove hop-by-hop fields and every field the Connection header names.

    Content-Length and Host are always kept, even if named in Connection.  With
    ``keep_upgrade=True`` the Upgrade fields are kept and, if there was at least
    one, ``Connection: upgrade`` is appended so the next hop sees the upgrade
    request (WebSocket).
    """
    nominated = connection_tokens(headers)
    if nominated:
        drop = (HOP_BY_HOP | nominated) - _NEVER_NOMINATED
        lengths = {len(t) for t in drop}
    else:
        drop = HOP_BY_HOP
        lengths = _HOP_BY_HOP_LENGTHS
    out: Headers = []
    upgrade_kept = False
    for name, value in headers:
        # Lowercasing only names of a droppable length saves an allocation per field.
        if len(name) in lengths and (lname := name.lower()) in drop:
            if keep_upgrade and lname == b"upgrade":
                upgrade_kept = True
            else:
                continue
        out.append((name, value))
    if upgrade_kept:
        out.append((b"Connection", b"upgrade"))
    return out


def forwardable_trailers(fields: Headers) -> Headers:
    """The trailer fields that may go upstream: those in L{TRAILER_FIELDS}, in order.

    C{fields} is left untouched; names keep their case.
    """
    return [(name, value) for name, value in fields if name.lower() in TRAILER_FIELDS]


def via_value(version: bytes, pseudonym: str) -> bytes:
    """The Via entry for a hop: ``b"1.1 router1 (tproxy-twist)"`` for ``b"HTTP/1.1"``."""
    if version.startswith(b"HTTP/"):
        version = version[5:]
    return version + b" " + pseudonym.encode("ascii") + b" (tproxy-twist)"


def add_via(headers: Headers, via: bytes) -> Headers:
    """A copy of ``headers`` with ``via`` appended to the last Via field, or a new Via field."""
    out = list(headers)
    for i in range(len(out) - 1, -1, -1):
        name, value = out[i]
        if len(name) == 3 and name.lower() == b"via":
            out[i] = (name, value + b", " + via if value else via)
            return out
    out.append((b"Via", via))
    return out


def _fields(parts: list[bytes], headers: Iterable[tuple[bytes, bytes]]) -> None:
    append = parts.append
    for name, value in headers:
        append(name)
        append(_COLON_SP)
        append(value)
        append(_CRLF)


def serialize_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head in HTTP/1.1 ending with CRLFCRLF."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    _fields(parts, headers)
    parts.append(_CRLF)
    return b"".join(parts)


def serialize_response_head(
    status: int, reason: bytes, headers: Headers, version: bytes = b"HTTP/1.1"
) -> bytes:
    """A response head ending with CRLFCRLF."""
    parts = [version, b" %d " % status, reason, _CRLF]
    _fields(parts, headers)
    parts.append(_CRLF)
    return b"".join(parts)


def encode_chunk(data: bytes) -> list[bytes]:
    """The pieces of one chunk carrying ``data``; [] for empty data (which would end the body)."""
    if not data:
        return []
    return [b"%x\r\n" % len(data), data, _CRLF]


def last_chunk(trailers: Headers) -> bytes:
    """The last chunk, trailer fields and the final CRLF that end a chunked body."""
    parts = [b"0\r\n"]
    _fields(parts, trailers)
    parts.append(_CRLF)
    return b"".join(parts)


def simple_response(
    status: int,
    reason_phrase: bytes,
    text: str,
    *,
    close: bool,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """A complete HTTP/1.1 response written by the proxy itself (an error page).

    The body is ``text`` plus a newline, as text/plain UTF-8, with Content-Length
    and ``Cache-Control: no-store``; ``Connection: close`` is added if ``close``;
    ``extra`` fields come last.
    """
    body = (text + "\n").encode("utf-8")
    headers: Headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Cache-Control", b"no-store"),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    headers.extend(extra)
    return serialize_response_head(status, reason_phrase, headers) + body
