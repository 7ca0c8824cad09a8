"""
Request-target forms (RFC 9112 section 3.2): where a request says it goes.
Sans-IO; raises L{framing.ProtocolError} for targets the proxy cannot use.
"""

from __future__ import annotations

import ipaddress

from .framing import ProtocolError


def parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """
    C{b"example.com:8080"} / C{b"[2001:db8::1]:80"} -> C{(host, port)}.
    Host names are returned as given (lowercased); IP literals unbracketed.
    """
    if not authority or b"@" in authority:
        raise ProtocolError(400, "invalid authority in request target")
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "non-ASCII authority in request target") from None
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ProtocolError(400, "unterminated IPv6 literal in request target")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ProtocolError(400, "invalid authority in request target")
            port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError(400, "invalid IPv6 literal in request target") from None
    else:
        host, sep, port_text = text.partition(":")
        if not host or any(c in host for c in " /\\?#%"):
            raise ProtocolError(400, "invalid host in request target")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ProtocolError(400, "invalid port in request target")
        port = int(port_text)
    elif default_port is None:
        raise ProtocolError(400, "CONNECT needs host:port")
    else:
        port = default_port
    return host.lower(), port


def split_absolute(target: bytes) -> tuple[bytes, bytes, bytes]:
    """
    C{b"http://example.com:8080/a?b"} -> C{(b"http", b"example.com:8080", b"/a?b")}.
    The path is origin-form (C{b"/"} when the URI has none).
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise ProtocolError(400, "request target is neither origin-form nor absolute-form")
    end = len(rest)
    for delimiter in (b"/", b"?"):
        i = rest.find(delimiter)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return scheme.lower(), authority, path
