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

import re
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

#: A DNS name, lower case: labels of 1 to 63 letters, digits, C{-} and C{_}.
_DNS_NAME = re.compile(rb"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_DIGITS_AND_DOTS = re.compile(rb"[0-9.]+")


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


_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))
#: Extensions the parse looks at (every other one is only checked for its
#: length and for appearing twice).
_NOTED = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS, EXT_ECH}) | _GREASE
_u16 = struct.Struct("!H").unpack_from
_extension_header = struct.Struct("!HH").unpack_from


def parse_client_hello_body(body: bytes, size: int) -> ClientHello:
    """
    Read a ClientHello's body (after the 4-byte handshake header).  This runs
    once per connection, so it reads with offsets, C{struct} and slices: no
    object per field, and the extensions it does not look into cost a length
    check and a set lookup each.
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
    versions: tuple[int, ...] = ()
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
            kind, length = _extension_header(body, pos)
            pos += 4
            content_end = pos + length
            if content_end > end:
                raise _malformed(f"extension {kind} overruns extensions")
            if kind in seen:
                raise _malformed(f"extension {kind} appears twice")
            seen.add(kind)
            if kind in _NOTED:
                if kind == EXT_SERVER_NAME:
                    sni = _server_name(body, pos, content_end)
                elif kind == EXT_ALPN:
                    alpn = _alpn(body, pos, content_end)
                elif kind == EXT_SUPPORTED_VERSIONS:
                    listed = _supported_versions(body, pos, content_end)
                    versions = tuple(v for v in listed if v not in _GREASE)
                    if len(versions) < len(listed):
                        grease = True
                elif kind == EXT_ECH:
                    ech = True
                else:
                    grease = True
            pos = content_end
    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions,
        legacy_version=legacy_version,
        ech=ech,
        grease=grease,
        size=size,
    )


def _vector16(body: bytes, pos: int, end: int, what: str, container: str) -> int:
    """
    The end of the 2-byte-length vector at C{pos}, which must fill its
    container up to C{end} exactly.
    """
    if end - pos < 2:
        raise _malformed(f"{container} is cut short")
    vector_end = pos + 2 + _u16(body, pos)[0]
    if vector_end > end:
        raise _malformed(f"{what} overruns {container}")
    if vector_end < end:
        raise _malformed(f"bytes after the {what}")
    return vector_end


def _server_name(body: bytes, pos: int, end: int) -> str | None:
    names_end = _vector16(body, pos, end, "server name list", "server_name")
    pos += 2
    host: str | None = None
    while pos < names_end:
        if names_end - pos < 3:
            raise _malformed("server name list is cut short")
        name_type = body[pos]
        name_end = pos + 3 + _u16(body, pos + 1)[0]
        if name_end > names_end:
            raise _malformed("server name overruns server name list")
        if name_type == 0:  # host_name: no other type is defined
            if host is not None:
                raise _malformed("two host names in the server_name extension")
            host = _host_name(body[pos + 3 : name_end])
        pos = name_end
    return host


def _host_name(raw: bytes) -> str:
    name = raw.lower().rstrip(b".")
    if len(name) > 253 or _DNS_NAME.fullmatch(name) is None:
        raise _malformed(f"server name {raw[:64]!r} is not a DNS name")
    if _DIGITS_AND_DOTS.fullmatch(name) is not None:  # every label all digits
        raise _malformed("server name is an IP address (RFC 6066 allows host names only)")
    return name.decode("ascii")


def _alpn(body: bytes, pos: int, end: int) -> tuple[str, ...]:
    protocols_end = _vector16(body, pos, end, "ALPN list", "ALPN")
    pos += 2
    offered = []
    while pos < protocols_end:
        protocol_end = pos + 1 + body[pos]
        if protocol_end > protocols_end:
            raise _malformed("ALPN protocol overruns ALPN list")
        if protocol_end == pos + 1:
            raise _malformed("an empty ALPN protocol name")
        offered.append(body[pos + 1 : protocol_end].decode("ascii", "backslashreplace"))
        pos = protocol_end
    if not offered:
        raise _malformed("an empty ALPN list")
    return tuple(offered)


def _supported_versions(body: bytes, pos: int, end: int) -> tuple[int, ...]:
    if pos >= end:
        raise _malformed("supported_versions is cut short")
    n = body[pos]
    if pos + 1 + n > end:
        raise _malformed("supported versions overruns supported_versions")
    if pos + 1 + n < end or n < 2 or n % 2:
        raise _malformed("supported versions must be a list of 2-byte values")
    return struct.unpack_from(f"!{n // 2}H", body, pos + 1)


def alert(description: int) -> bytes:
    """A fatal TLS alert record, e.g. C{alert(ALERT_ACCESS_DENIED)}."""
    return bytes([_ALERT, 3, 3, 0, 2, 2, description])
