"""
The ClientHello body parse as it was before it was rewritten for speed
(commit bfe0c42): the reference that test_tls_clienthello.py compares the
new one with, value for value and error reason for error reason.
"""

from __future__ import annotations

import struct

from tproxy_twist.tls.clienthello import (
    EXT_ALPN,
    EXT_ECH,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    ClientHello,
    HelloError,
)

_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _malformed(detail: str) -> HelloError:
    return HelloError("malformed", detail)


class _Cursor:
    """Reads a byte string front to back; any overrun is L{HelloError}(malformed)."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.what = what

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise _malformed(f"{self.what} is cut short")
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def take_rest(self) -> bytes:
        return self.take(self.end - self.pos)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int, what: str) -> _Cursor:
        """The next length-prefixed vector, as a cursor of its own."""
        n = int.from_bytes(self.take(length_bytes), "big")
        if n > self.end - self.pos:
            raise _malformed(f"{what} overruns {self.what}")
        inner = _Cursor(self.data, what, self.pos, self.pos + n)
        self.pos += n
        return inner


_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))


def parse_client_hello_body(body: bytes, size: int) -> ClientHello:
    """
    Read a ClientHello's body (after the 4-byte handshake header).  The fixed
    part and the extension list are read with offsets and C{struct} (this runs
    once per connection); the few extensions we look into get a L{_Cursor}.
    """
    end = len(body)
    if end < 35:
        raise _malformed("ClientHello is cut short")
    legacy_version = (body[0] << 8) | body[1]
    pos = 34  # after the version and the 32-byte random
    session_id = body[pos]
    if session_id > 32:
        raise _malformed("session id longer than 32 bytes")
    pos += 1 + session_id
    if pos + 2 > end:
        raise _malformed("ClientHello is cut short")
    suites_length = (body[pos] << 8) | body[pos + 1]
    pos += 2
    if suites_length < 2 or suites_length % 2:
        raise _malformed("cipher suites must be a non-empty list of 2-byte values")
    if pos + suites_length > end:
        raise _malformed("cipher suites overrun ClientHello")
    grease = not _GREASE.isdisjoint(struct.unpack_from(f"!{suites_length // 2}H", body, pos))
    pos += suites_length
    if pos >= end:
        raise _malformed("ClientHello is cut short")
    compression = body[pos]
    pos += 1
    if compression < 1:
        raise _malformed("no compression methods")
    if pos + compression > end:
        raise _malformed("compression methods overrun ClientHello")
    pos += compression
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: list[int] = []
    ech = False
    if pos < end:
        if pos + 2 > end:
            raise _malformed("ClientHello is cut short")
        extensions_end = pos + 2 + ((body[pos] << 8) | body[pos + 1])
        pos += 2
        if extensions_end > end:
            raise _malformed("extensions overrun ClientHello")
        if extensions_end < end:
            raise _malformed("bytes after the extensions")
        seen: set[int] = set()
        while pos < end:
            if pos + 4 > end:
                raise _malformed("extensions are cut short")
            kind, length = struct.unpack_from("!HH", body, pos)
            pos += 4
            content_end = pos + length
            if content_end > end:
                raise _malformed(f"extension {kind} overruns extensions")
            if kind in seen:
                raise _malformed(f"extension {kind} appears twice")
            seen.add(kind)
            if kind in _GREASE:
                grease = True
            elif kind == EXT_SERVER_NAME:
                sni = _server_name(_Cursor(body, "server_name", pos, content_end))
            elif kind == EXT_ALPN:
                alpn = _alpn(_Cursor(body, "ALPN", pos, content_end))
            elif kind == EXT_SUPPORTED_VERSIONS:
                content = _Cursor(body, "supported_versions", pos, content_end)
                listed = content.vector(1, "supported versions")
                if content.left() or listed.left() < 2 or listed.left() % 2:
                    raise _malformed("supported versions must be a list of 2-byte values")
                while listed.left():
                    version = listed.u16()
                    if version in _GREASE:
                        grease = True
                    else:
                        versions.append(version)
            elif kind == EXT_ECH:
                ech = True
            pos = content_end
    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=tuple(versions),
        legacy_version=legacy_version,
        ech=ech,
        grease=grease,
        size=size,
    )


def _server_name(content: _Cursor) -> str | None:
    names = content.vector(2, "server name list")
    if content.left():
        raise _malformed("bytes after the server name list")
    host: str | None = None
    while names.left():
        name_type = names.u8()
        name = names.vector(2, "server name").take_rest()
        if name_type != 0:
            continue  # not host_name: no other type is defined
        if host is not None:
            raise _malformed("two host names in the server_name extension")
        host = _host_name(name)
    return host


def _host_name(raw: bytes) -> str:
    name = raw.lower().rstrip(b".")
    if not name or len(name) > 253 or not _HOST_CHARS.issuperset(name):
        raise _malformed(f"server name {raw[:64]!r} is not a DNS name")
    labels = name.split(b".")
    if any(not label or len(label) > 63 for label in labels):
        raise _malformed(f"server name {raw[:64]!r} is not a DNS name")
    if all(label.isdigit() for label in labels):
        raise _malformed("server name is an IP address (RFC 6066 allows host names only)")
    return name.decode("ascii")


def _alpn(content: _Cursor) -> tuple[str, ...]:
    protocols = content.vector(2, "ALPN list")
    if content.left():
        raise _malformed("bytes after the ALPN list")
    offered = []
    while protocols.left():
        protocol = protocols.vector(1, "ALPN protocol").take_rest()
        if not protocol:
            raise _malformed("an empty ALPN protocol name")
        offered.append(protocol.decode("ascii", "backslashreplace"))
    if not offered:
        raise _malformed("an empty ALPN list")
    return tuple(offered)
