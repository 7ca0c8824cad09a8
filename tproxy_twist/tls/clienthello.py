"""
A sans-IO reader of a TLS ClientHello (RFC 8446 section 4.1.2, RFC 5246
section 7.4.1.2): bytes in, a L{ClientHello} out.  No transport, no clock.

It reassembles the hello across TCP segments and TLS records (post-quantum
key shares make hellos larger than one segment, and a client may cut its
records anywhere), and reads what a splice decision needs: the SNI, the ALPN
list, the supported versions, and whether ECH or GREASE values are present.
It never decrypts or answers anything; every byte it was fed stays available
(L{ClientHelloReader.buffered}) to be replayed to the origin.

Strictness, each a L{HelloError} with a bounded C{reason} (a metric label):
  - the first byte is not 0x16 (a handshake record): C{not_tls};
  - more than C{max_size} bytes (64 KiB, as Envoy) before the hello is
    complete, or a hello that says it is larger: C{too_large};
  - any other violation of the record or hello syntax: C{malformed}.  That
    includes a record that is not a handshake record before the hello is
    complete, a zero-length or over-long (2^14) record, a handshake message
    other than ClientHello first, bytes after the hello inside its last
    record, lengths that overrun their container, an extension that appears
    twice, two host names, and an SNI that is not a DNS name (letters,
    digits, C{-}, C{_} and dots; an IP literal is not allowed by RFC 6066).
"""

from __future__ import annotations

import struct

import attrs

__all__ = [
    "ALERT_ACCESS_DENIED",
    "ClientHello",
    "ClientHelloReader",
    "HelloError",
    "MAX_HELLO_SIZE",
    "alert",
    "is_grease",
    "version_name",
]

MAX_HELLO_SIZE = 65536

_HANDSHAKE = 0x16
_ALERT = 0x15
_CLIENT_HELLO = 1
_MAX_RECORD = 1 << 14  # plaintext record limit (RFC 8446 section 5.1)

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_ECH = 0xFE0D  # encrypted_client_hello (draft-ietf-tls-esni)

ALERT_ACCESS_DENIED = 49
ALERT_INTERNAL_ERROR = 80

_VERSION_NAMES = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}

_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


class HelloError(Exception):
    """The bytes are not an acceptable ClientHello; C{reason} is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _malformed(detail: str) -> HelloError:
    return HelloError("malformed", detail)


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0A0A, 0x1A1A, ... 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def version_name(version: int) -> str:
    """C{0x0304} -> C{"TLSv1.3"}; unknown values as hex."""
    return _VERSION_NAMES.get(version, f"0x{version:04x}")


@attrs.frozen
class ClientHello:
    """What a ClientHello says, as far as a splice decision needs."""

    sni: str | None  # the host_name, lower case; None without a server_name extension
    alpn: tuple[str, ...]  # offered protocols, in order (non-ASCII bytes escaped)
    versions: tuple[int, ...]  # supported_versions, GREASE removed; () if absent
    legacy_version: int  # client_version of the hello body
    ech: bool  # an encrypted_client_hello extension is present: the SNI is the outer name
    grease: bool  # GREASE values in the cipher suites, extensions or versions
    size: int  # bytes of the handshake message, header included

    @property
    def tls_version(self) -> str:
        """The highest version offered, e.g. C{"TLSv1.3"}."""
        if self.versions:
            return version_name(max(self.versions))
        return version_name(self.legacy_version)


class ClientHelloReader:
    """
    Feed it bytes as they arrive; L{feed} returns the L{ClientHello} once it
    is complete, C{None} while more bytes are needed, or raises L{HelloError}.
    Each byte is looked at a bounded number of times however the input is
    split, so trickling a hello in one byte at a time costs nothing extra.
    """

    __slots__ = ("_data", "_pos", "_handshake", "_max_size", "_hello")

    def __init__(self, max_size: int = MAX_HELLO_SIZE) -> None:
        self._data = bytearray()
        self._pos = 0  # start of the next record not yet taken apart
        self._handshake = bytearray()  # handshake bytes reassembled from records
        self._max_size = max_size
        self._hello: ClientHello | None = None

    @property
    def buffered(self) -> bytes:
        """Every byte fed so far, to be replayed unchanged."""
        return bytes(self._data)

    def feed(self, data: bytes) -> ClientHello | None:
        if self._hello is not None:
            self._data += data
            return self._hello
        if not self._data and data and data[0] != _HANDSHAKE:
            raise HelloError("not_tls", f"first byte 0x{data[0]:02x} is not a TLS handshake record")
        self._data += data
        hello = None
        while hello is None and self._complete_record_waiting():
            hello = self._next_record()
        if hello is None and len(self._data) > self._max_size:
            raise HelloError("too_large", f"no complete ClientHello in {self._max_size} bytes")
        return hello

    def _complete_record_waiting(self) -> bool:
        """Whether a record header is here (checked at once), and its whole record."""
        data = self._data
        pos = self._pos
        if pos + 5 > len(data):
            return False
        kind, major, _minor, length = struct.unpack_from("!BBBH", data, pos)
        if kind != _HANDSHAKE:
            raise _malformed(f"record type {kind} before the ClientHello was complete")
        if major != 3:
            raise _malformed(f"record version {major}.{_minor} is not TLS")
        if length == 0 or length > _MAX_RECORD:
            raise _malformed(f"record length {length} (1 to {_MAX_RECORD} allowed)")
        end = pos + 5 + length
        if end > self._max_size:
            raise HelloError("too_large", f"records beyond {self._max_size} bytes")
        return end <= len(data)

    def _next_record(self) -> ClientHello | None:
        """Take the complete record at C{_pos} apart; the hello once it is whole."""
        data = self._data
        pos = self._pos
        length = struct.unpack_from("!H", data, pos + 3)[0]
        end = pos + 5 + length
        self._pos = end
        handshake = self._handshake
        handshake += data[pos + 5 : end]
        if len(handshake) < 4:
            return None
        if handshake[0] != _CLIENT_HELLO:
            raise _malformed(f"handshake message type {handshake[0]} is not a ClientHello")
        size = 4 + int.from_bytes(handshake[1:4], "big")
        if size > self._max_size:
            raise HelloError("too_large", f"the ClientHello says it has {size} bytes")
        if len(handshake) < size:
            return None
        if len(handshake) > size:
            raise _malformed("bytes after the ClientHello in its last record")
        self._hello = parse_client_hello_body(bytes(handshake[4:]), size)
        return self._hello


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


def alert(description: int) -> bytes:
    """A fatal TLS alert record, e.g. C{alert(ALERT_ACCESS_DENIED)}."""
    return bytes([_ALERT, 3, 3, 0, 2, 2, description])
