"""
Request-target forms (RFC 9112 section 3.2): where a request says it goes.
Sans-IO; raises L{framing.ProtocolError} (status 400) for targets the proxy
cannot use, with a reason a client can act on.

An absolute-form target is checked as strictly as a Host field: the scheme is
the one the port serves (C{http} on a plain-HTTP port), there is no userinfo,
the host is not empty, a bracketed IPv6 literal is complete and valid, and a
port, if given, is 1-65535.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from .framing import ProtocolError

__all__ = ["parse_authority", "split_absolute"]

# RFC 3986 reg-name (a host name or an IPv4 address), as framing accepts it in Host.
_REG_NAME: Final = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")


def parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """
    C{b"example.com:8080"} / C{b"[2001:db8::1]:80"} -> C{(host, port)}.

    Host names are returned lowercased; IP literals unbracketed.  An empty
    port (C{b"example.com:"}) means C{default_port}; without one (None) a
    port is required (CONNECT).  Raises L{ProtocolError} 400 for userinfo, an
    empty or invalid host, an incomplete or invalid IPv6 literal, or a port
    outside 1-65535.
    """
    if not authority:
        raise ProtocolError(400, "empty authority in request target")
    if b"@" in authority:
        raise ProtocolError(400, "userinfo (user@) in request target is not allowed")
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
        if "%" in host:
            raise ProtocolError(400, "IPv6 zone identifier in request target")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError(400, "invalid IPv6 literal in request target") from None
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ProtocolError(400, "empty host in request target")
        if _REG_NAME.fullmatch(host) is None:
            raise ProtocolError(400, "invalid host in request target")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ProtocolError(400, "invalid port in request target (1-65535)")
        port = int(port_text)
    elif default_port is None:
        raise ProtocolError(400, "CONNECT needs host:port")
    else:
        port = default_port  # also for "host:": RFC 3986 allows an empty port
    return host.lower(), port


def split_absolute(target: bytes, scheme: bytes | None = b"http") -> tuple[bytes, bytes, bytes]:
    """
    C{b"http://example.com:8080/a?b"} -> C{(b"http", b"example.com:8080", b"/a?b")}.

    The path is origin-form (C{b"/"} when the URI has none).  The authority is
    validated with L{parse_authority}.  C{scheme} is the only scheme accepted
    (lowercase; the default C{b"http"} suits a plain-HTTP port); None accepts
    any.  Every refusal is a L{ProtocolError} with status 400.
    """
    given, sep, rest = target.partition(b"://")
    if not sep:
        raise ProtocolError(400, "request target is neither origin-form nor absolute-form")
    given = given.lower()
    if scheme is not None and given != scheme:
        shown = given.decode("ascii", "replace")
        if given == b"https" and scheme == b"http":
            raise ProtocolError(
                400,
                "https:// URL sent as plain HTTP: only http:// URLs are served here"
                " (a proxy client sends CONNECT for https)",
            )
        raise ProtocolError(
            400, f"{shown}:// URLs are not supported: only {scheme.decode('ascii')}:// here"
        )
    end = len(rest)
    for delimiter in (b"/", b"?"):
        i = rest.find(delimiter)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    parse_authority(authority, 80)
    if not path.startswith(b"/"):
        path = b"/" + path
    return given, authority, path
