"""
The configuration file: TOML in, frozen attrs classes out.

Every mistake a user can make becomes a L{ConfigError} whose message names
the file, the key and what is allowed; nothing else in the package parses
configuration.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .destinations import ALL_PORTS, DestinationPolicy, DestinationRule
from .tls.decide import ACTIONS, TLSPolicy, TLSRule

MODES = ("tproxy", "forward", "intercept")
PROTOCOLS = ("http", "tls")
ON_NOT_TLS = ("close", "tunnel")
#: How a port relays byte streams (TLS passthrough, tunnels): see PortConfig.stream_relay.
STREAM_RELAYS = ("copy", "splice")

# Squid's `http_access allow localnet` default, as networks: a forward port
# is not an open relay unless the operator says so.
DEFAULT_FORWARD_ALLOW = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
ALLOW_EVERYONE = ("0.0.0.0/0", "::/0")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """
    A configuration the proxy refuses to run with.  C{str(error)} is a
    complete message for the user: C{"FILE: KEY: reason"}.
    """


@attrs.frozen
class ListenAddress:
    host: str  # an IP literal without brackets: "0.0.0.0", "::", "127.0.0.1"
    port: int

    @property
    def family(self) -> int:
        import socket

        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def overlaps(self, other: ListenAddress) -> bool:
        """
        Whether both addresses would receive the same connections.  A "::"
        socket also serves IPv4 (we never set IPV6_V6ONLY), and SO_REUSEPORT
        would let the kernel split traffic between overlapping sockets.
        """
        if self.port != other.port:
            return False
        if self.host == other.host or "::" in (self.host, other.host):
            return True
        if self.family != other.family:
            return False
        return self.is_wildcard or other.is_wildcard


@attrs.frozen
class PortConfig:
    name: str
    listen: ListenAddress
    mode: str
    spoof_client_ip: bool
    allow: tuple[IPNetwork, ...]
    connect_ports: tuple[int, ...]
    divert: tuple[int, ...]
    host_verify_strict: bool = False  # Host disagreeing with the original destination: 409
    x_forwarded_for: str = "off"  # off: pass as received; append: add the client; strip
    # Proxy policy (issue 11): Via on or off, where clients may make us connect, who may.
    via: bool = True  # add our Via entry to requests and responses
    destinations: DestinationPolicy = DestinationPolicy()  # allow/deny_destinations
    auth: AuthConfig | None = None  # forward ports: proxy authentication (407)
    protocol: str = "http"  # "tls": the port carries TLS (a ClientHello first), see tls/
    tls: TLSPortConfig | None = None  # set exactly when protocol == "tls"
    # Byte streams relayed unread (TLS passthrough, not-TLS, CONNECT and Upgrade
    # tunnels): "copy" through the worker's buffer, or "splice" with splice(2).
    stream_relay: str = "copy"
    # Asked for every connection: worked out once (the cached function hashed
    # every network of C{allow} on each call).
    _allows_everyone: bool = attrs.field(init=False, default=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_allows_everyone", _covers_everything(self.allow))

    def allows(self, ip: str) -> bool:
        if self._allows_everyone:
            return True
        address = ipaddress.ip_address(ip)
        return any(address in network for network in self.allow)

    @property
    def allows_everyone(self) -> bool:
        return self._allows_everyone


@attrs.frozen
class TLSPortConfig:
    """What a C{protocol = "tls"} port does with a connection (see L{tproxy_twist.tls})."""

    policy: TLSPolicy = TLSPolicy()
    on_not_tls: str = "close"  # data that is not TLS: "close", or "tunnel" it to the destination
    client_hello_timeout: float = 5.0  # seconds for the whole ClientHello to arrive
    block_quic: bool = True  # `tproxy-twist rules` rejects UDP to the diverted ports


@attrs.frozen
class Timeouts:
    """Seconds.  Each bounds one wait so that no connection hangs forever."""

    connect: float = 10.0  # upstream TCP connect
    response: float = 60.0  # request sent -> first byte of the upstream response
    request_header: float = 30.0  # first byte of a request -> end of its head
    client_idle: float = 60.0  # keep-alive connection waiting for its next request
    idle: float = 300.0  # no bytes either way while a body or tunnel is relayed


@attrs.frozen
class Limits:
    """Bytes and counts.  The head limits are no stricter than real clients and
    servers: heads of up to 64 KiB either way (Squid's request_header_max_size and
    reply_header_max_size), no limit on one field line below the whole head's
    (a 9 KB Cookie or Set-Cookie passes), URLs as long as a head may be."""

    max_request_line: int = 65536  # longer request line: 414
    max_header_size: int = 65536  # larger request header (or trailer) section: 431
    max_response_header_size: int = 65536  # larger response head or trailer section: 502
    max_header_fields: int = 100  # more fields in a request (431) or response (502)
    max_chunk_extensions: int = 4096  # chunk extensions on one chunk-size line; more: 400/502
    max_body_size: int = 0  # request body bytes; larger: 413; 0: no limit
    max_connections: int = 10000  # per worker; beyond, it stops accepting for a while
    max_connections_per_client: int = 0  # per worker and client IP; beyond: 429; 0: off
    # Response bodies with at least this many bytes of a Content-Length still to
    # come are relayed with splice(2), not through the worker; 0: never.
    splice_body_min: int = 524288


# (minimum, maximum) of each limit
_LIMIT_RANGES = {
    "max_request_line": (64, 1 << 20),
    "max_header_size": (256, 1 << 24),
    "max_response_header_size": (256, 1 << 24),
    "max_header_fields": (8, 10_000),
    "max_chunk_extensions": (0, 1 << 20),
    "max_body_size": (0, 1 << 62),
    "max_connections": (1, 1 << 22),
    "max_connections_per_client": (0, 1 << 22),
    "splice_body_min": (0, 1 << 62),
}
X_FORWARDED_FOR = ("off", "append", "strip")


@attrs.frozen
class AccessLogConfig:
    path: str | None = None  # None: no access log
    format: str = "squid"  # "squid" (Squid's native format) or "json" (JSON lines)
    # Seconds a worker lets lines gather before writing them (as nginx's
    # access_log flush=); 0: each line is handed to the writer at once.
    flush_interval: float = 0.0


ACCESS_LOG_MAX_FLUSH_INTERVAL = 10.0


ACCESS_LOG_FORMATS = ("squid", "json")


# --- [tls]: bumping (the CA, leaf certificates, origin verification) ----------------

ON_VERIFY_FAILURE = ("splice", "terminate")


@attrs.frozen
class TLSConfig:
    """The C{[tls]} table: what bumped connections need."""

    ca_cert: str = "/etc/tproxy-twist/ca.pem"  # the CA certificate (and its chain), PEM
    ca_key: str = "/etc/tproxy-twist/ca.key"  # its key, PEM, mode 0600
    ca_bundle: str | None = None  # origins are verified against this PEM file; None: the system's
    leaf_cache_size: int = 1000  # forged leaves kept per worker (LRU)
    on_verify_failure: str = "splice"  # origin fails verification: splice, or terminate
    pinned_splice_after: int = 0  # client rejections of our certificate before a host is spliced


def _tls(table: _Table | None) -> TLSConfig:
    if table is None:
        return TLSConfig()
    defaults = TLSConfig()
    ca_cert = _tls_path(table, "ca_cert", defaults.ca_cert)
    ca_key = _tls_path(table, "ca_key", defaults.ca_key)
    if ca_cert == ca_key:
        raise table.error("ca_key", "must be a file of its own, not the certificate's file")
    ca_bundle = _tls_path(table, "ca_bundle", "", empty=True) or None
    leaf_cache_size = table.integer(
        "leaf_cache_size", default=defaults.leaf_cache_size, minimum=1, maximum=1_000_000
    )
    on_verify_failure = table.get("on_verify_failure", defaults.on_verify_failure, str)
    if on_verify_failure not in ON_VERIFY_FAILURE:
        raise table.error(
            "on_verify_failure",
            f"must be one of {', '.join(ON_VERIFY_FAILURE)}, not {on_verify_failure!r}",
        )
    pinned_splice_after = table.integer(
        "pinned_splice_after", default=defaults.pinned_splice_after, minimum=0, maximum=1_000_000
    )
    table.done()
    return TLSConfig(
        ca_cert=ca_cert,
        ca_key=ca_key,
        ca_bundle=ca_bundle,
        leaf_cache_size=leaf_cache_size,
        on_verify_failure=on_verify_failure,
        pinned_splice_after=pinned_splice_after,
    )


def _tls_path(table: _Table, key: str, default: str, *, empty: bool = False) -> str:
    value = table.get(key, default, str)
    if not value and not empty:
        raise table.error(key, "must name a file")
    if "\0" in value:
        raise table.error(key, "must be a file name (it contains a NUL character)")
    return value


# --- end of [tls] -----------------------------------------------------------------------


@attrs.frozen
class AuthConfig:
    """
    A forward port's C{auth} table: Basic proxy authentication against an
    htpasswd file of bcrypt entries (C{htpasswd -B}).  C{users} is the file
    as read when the configuration was loaded (a reload reads it again).
    """

    htpasswd: str  # absolute path
    users: tuple[tuple[str, bytes], ...]  # (user name, bcrypt hash), in file order
    realm: str = "tproxy-twist"
    credentials_ttl: float = 60.0  # seconds a verified user:password is remembered
    max_failures: int = 10  # wrong passwords per client address in a burst (then 429) ...
    failure_window: float = 60.0  # ... and the seconds in which that allowance refills


@attrs.frozen
class Config:
    path: str
    workers: int
    metrics_listen: ListenAddress | None
    ports: tuple[PortConfig, ...]
    timeouts: Timeouts
    limits: Limits
    user: str | None = None  # run the processes that relay traffic as this user
    group: str | None = None  # ... and group (default: the user's primary group)
    drain_timeout: float = 30.0  # reload/stop: seconds to finish in-flight requests
    access_log: AccessLogConfig = AccessLogConfig()
    visible_hostname: str | None = None  # our name in Via; None: the host name
    tls: TLSConfig = TLSConfig()
    # A worker whose heartbeat stops (stopped, stuck in a loop, deadlocked) is
    # shown as not ready at once, and killed and replaced after this long.
    heartbeat_grace: float = 10.0
    # [metrics] status_allow: the networks /status and /status.json answer.
    status_allow: tuple[IPNetwork, ...] = attrs.field(
        factory=lambda: tuple(ipaddress.ip_network(n) for n in ALLOW_EVERYONE)
    )

    @property
    def bumps(self) -> bool:
        """Whether a TLS port may bump: the workers then need the C{[tls]} CA (and OpenSSL)."""
        return any(port.tls is not None and port.tls.policy.bumps for port in self.ports)


@functools.lru_cache(maxsize=64)
def _covers_everything(networks: tuple[IPNetwork, ...]) -> bool:
    return any(n.prefixlen == 0 and n.version == 4 for n in networks) and any(
        n.prefixlen == 0 and n.version == 6 for n in networks
    )


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)


def loads(text: str, path: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)


def parse(data: Mapping[str, Any], path: str) -> Config:
    table = _Table(data, path, "")
    workers = table.integer("workers", default=0, minimum=0, maximum=1024)
    metrics = table.table("metrics") or _Table({}, path, "metrics")
    metrics_listen = None  # listen = "" turns the metrics listener off
    if metrics.get("listen", None, str) != "":
        metrics_listen = metrics.address("listen", default="127.0.0.1:9464")
    # /status and /status.json: only these clients of the metrics listener (default: all).
    status_allow = tuple(metrics.network_list("status_allow", ALLOW_EVERYONE))
    metrics.done()
    timeouts = _timeouts(table.table("timeouts"))
    limits = _limits(table.table("limits"))
    access_log = _access_log(table.table("access_log"))
    tls = _tls(table.table("tls"))
    user = table.get("user", None, str)
    group = table.get("group", None, str)
    _check_identity(table, user, group)
    drain_timeout = table.number("drain_timeout", default=30.0, minimum=0.0)
    visible_hostname = _visible_hostname(table)
    heartbeat_grace = table.number("heartbeat_grace", default=10.0, minimum=1.0)
    raw_ports = table.get("port", [], list)
    table.done()
    if not raw_ports:
        raise ConfigError(f"{path}: port: at least one [[port]] table is required")
    ports = tuple(
        _port(_Table(p, path, f"port[{i}]"), i) for i, p in enumerate(_tables(raw_ports, path))
    )
    _check_ports(ports, path)
    _check_metrics_listen(metrics_listen, ports, path)
    return Config(
        path=path,
        workers=workers,
        metrics_listen=metrics_listen,
        ports=ports,
        timeouts=timeouts,
        limits=limits,
        user=user,
        group=group,
        drain_timeout=drain_timeout,
        access_log=access_log,
        visible_hostname=visible_hostname,
        tls=tls,
        heartbeat_grace=heartbeat_grace,
        status_allow=status_allow,
    )


def _check_identity(table: _Table, user: str | None, group: str | None) -> None:
    import grp
    import pwd

    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise table.error("user", f"no such user {user!r} on this system") from None
    if group is not None:
        if user is None:
            raise table.error("group", "needs `user` as well")
        try:
            grp.getgrnam(group)
        except KeyError:
            raise table.error("group", f"no such group {group!r} on this system") from None


def _access_log(table: _Table | None) -> AccessLogConfig:
    if table is None:
        return AccessLogConfig()
    path = table.get("path", "", str)
    format = table.get("format", "squid", str)
    if format not in ACCESS_LOG_FORMATS:
        raise table.error("format", f"must be one of {', '.join(ACCESS_LOG_FORMATS)}")
    flush_interval = table.number("flush_interval", default=0.0, minimum=0.0)
    if flush_interval > ACCESS_LOG_MAX_FLUSH_INTERVAL:
        raise table.error(
            "flush_interval",
            f"must be at most {ACCESS_LOG_MAX_FLUSH_INTERVAL:g} seconds, not {flush_interval:g}",
        )
    table.done()
    return AccessLogConfig(path=path or None, format=format, flush_interval=flush_interval)


def _tables(raw: list[Any], path: str) -> list[Mapping[str, Any]]:
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{path}: port[{i}]: must be a table ([[port]])")
    return raw


def _port(table: _Table, index: int) -> PortConfig:
    listen = table.address("listen")
    mode = table.get("mode", None, str)
    if mode is None:
        raise table.error("mode", f"is required; one of {', '.join(MODES)}")
    if mode not in MODES:
        raise table.error("mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    name = table.get("name", str(listen.port), str)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise table.error("name", "must be non-empty letters, digits, '-', '_' or '.'")
    spoof = table.get("spoof_client_ip", mode == "tproxy", bool)
    if spoof and mode == "forward":
        raise table.error("spoof_client_ip", "is only possible on tproxy and intercept ports")
    default_allow = DEFAULT_FORWARD_ALLOW if mode == "forward" else ALLOW_EVERYONE
    allow = tuple(table.network_list("allow", default_allow))
    connect_ports = table.port_list("connect_ports", (443,), only_for="forward", mode=mode)
    protocol = table.get("protocol", "http", str)
    if protocol not in PROTOCOLS:
        raise table.error("protocol", f"must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if protocol == "tls" and mode == "forward":
        raise table.error(
            "protocol", '"tls" needs a tproxy or intercept port (forward ports carry CONNECT)'
        )
    divert_default = (443,) if protocol == "tls" else (80,)
    divert = table.port_list("divert", divert_default, only_for="tproxy", mode=mode)
    tls = _tls_port(table) if protocol == "tls" else _no_tls_keys(table)
    host_verify_strict = table.get("host_verify_strict", False, bool)
    if host_verify_strict and mode == "forward":
        raise table.error("host_verify_strict", "only applies to tproxy and intercept ports")
    x_forwarded_for = table.get("x_forwarded_for", "off", str)
    if x_forwarded_for not in X_FORWARDED_FOR:
        raise table.error("x_forwarded_for", f"must be one of {', '.join(X_FORWARDED_FOR)}")
    via = table.get("via", True, bool)
    stream_relay = table.get("stream_relay", "copy", str)
    if stream_relay not in STREAM_RELAYS:
        raise table.error("stream_relay", f"must be one of {', '.join(STREAM_RELAYS)}")
    destinations = DestinationPolicy(
        deny=table.destination_list("deny_destinations", allow=False),
        allow=table.destination_list("allow_destinations", allow=True),
    )
    auth = _auth(table, mode)
    if protocol == "tls":
        _no_http_policy_keys(table)
    table.done()
    return PortConfig(
        name=name,
        listen=listen,
        mode=mode,
        spoof_client_ip=spoof,
        allow=allow,
        connect_ports=connect_ports,
        divert=divert,
        host_verify_strict=host_verify_strict,
        x_forwarded_for=x_forwarded_for,
        via=via,
        destinations=destinations,
        auth=auth,
        protocol=protocol,
        tls=tls,
        stream_relay=stream_relay,
    )


# --- proxy policy (issue 11): Via name, destination rules, proxy authentication ---


def _visible_hostname(table: _Table) -> str | None:
    name = table.get("visible_hostname", None, str)
    if name is not None and not _HOSTNAME.fullmatch(name):
        raise table.error(
            "visible_hostname",
            f"{name!r} must be a host name: 1 to 253 letters, digits, '-', '_' and '.'",
        )
    return name


_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
# Goes into Proxy-Authenticate's quoted-string: printable ASCII without '"' and '\'.
_REALM = re.compile(r"[ !#-\[\]-~]{1,200}")


def parse_destination(text: str, *, allow: bool) -> DestinationRule:
    """
    Parse one C{allow_destinations} / C{deny_destinations} entry: a network
    (C{"203.0.113.0/24"}, C{"198.51.100.7"}, C{"2001:db8::/32"}) or C{"*"}
    (every address), optionally followed by C{:} and ports or port ranges
    (C{"203.0.113.0/24:80,443,8000-8999"}; an IPv6 network with ports is
    written in brackets, C{"[2001:db8::/32]:443"}).  Raises C{ValueError}
    with a reason.
    """
    spec = text.strip()
    ports_text = None
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0 or (len(spec) > end + 1 and spec[end + 1] != ":"):
            raise ValueError(f"{text!r}: write an IPv6 network with ports as [2001:db8::/32]:443")
        network_text = spec[1:end]
        if len(spec) > end + 1:
            ports_text = spec[end + 2 :]
    elif spec.count(":") == 1:
        network_text, _, ports_text = spec.partition(":")
    else:
        network_text = spec  # IPv4, "*" or an IPv6 network without ports
    network = None
    if network_text != "*":
        try:
            network = ipaddress.ip_network(network_text, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r}: {network_text!r} is not an IP network such as 203.0.113.0/24,"
                " [2001:db8::/32] or *"
            ) from None
        network = _unmapped(network)
    ports = ALL_PORTS if ports_text is None else _port_ranges(text, ports_text)
    return DestinationRule(allow=allow, network=network, ports=ports, text=spec)


def _unmapped(network: IPNetwork) -> IPNetwork:
    """::ffff:10.0.0.0/104 -> 10.0.0.0/8: addresses are checked in their IPv4 form."""
    mapped = ipaddress.ip_network("::ffff:0:0/96")
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(mapped):
        ipv4 = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{ipv4}/{network.prefixlen - 96}")
    return network


_DIGITS = re.compile(r"[0-9]{1,5}")


def _port_ranges(text: str, ports_text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in ports_text.split(","):
        low, dash, high = item.strip().partition("-")
        if not _DIGITS.fullmatch(low) or (dash and not _DIGITS.fullmatch(high)):
            raise ValueError(f"{text!r}: ports must look like 80,443,8000-8999, not {item!r}")
        first, last = int(low), int(high) if dash else int(low)
        if not 0 < first <= last < 65536:
            raise ValueError(f"{text!r}: port range {item!r} must be within 1-65535, low-high")
        ranges.append((first, last))
    return tuple(ranges)


def _no_http_policy_keys(table: _Table) -> None:
    """
    C{via} is not configurable on TLS ports.  Their C{allow/deny_destinations}
    do apply: to the original destination of every connection, whatever its
    action (L{tproxy_twist.tls.layer}).
    """
    if "via" in table._data:
        raise table.error("via", 'does not apply to TLS ports (protocol = "tls")')


def _auth(port: _Table, mode: str) -> AuthConfig | None:
    table = port.table("auth")
    if table is None:
        return None
    if mode != "forward":
        raise port.error("auth", f"only applies to forward ports, this port's mode is {mode}")
    path = table.get("htpasswd", None, str)
    if path is None:
        raise table.error("htpasswd", 'is required, e.g. "/etc/tproxy-twist/htpasswd"')
    if not os.path.isabs(path):
        raise table.error("htpasswd", f"{path!r} must be an absolute path")
    from .auth import HtpasswdError, read_htpasswd

    try:
        users = read_htpasswd(path)
    except OSError as e:
        raise table.error("htpasswd", f"cannot read {path}: {e.strerror}") from None
    except HtpasswdError as e:
        raise table.error("htpasswd", str(e)) from None
    realm = table.get("realm", "tproxy-twist", str)
    if not _REALM.fullmatch(realm):
        raise table.error("realm", 'must be 1 to 200 printable ASCII characters without " or \\')
    ttl = table.number("credentials_ttl", default=60.0, minimum=0.0)
    max_failures = table.integer("max_failures", default=10, minimum=1, maximum=1_000_000)
    window = table.number("failure_window", default=60.0, minimum=0.001)
    table.done()
    return AuthConfig(
        htpasswd=path,
        users=users,
        realm=realm,
        credentials_ttl=ttl,
        max_failures=max_failures,
        failure_window=window,
    )


_TLS_KEYS = ("on_not_tls", "client_hello_timeout", "block_quic", "tls")


def _no_tls_keys(table: _Table) -> None:
    for key in _TLS_KEYS:
        if key in table._data:
            raise table.error(key, 'only applies to ports with protocol = "tls"')
    return None


def _tls_port(table: _Table) -> TLSPortConfig:
    on_not_tls = table.get("on_not_tls", "close", str)
    if on_not_tls not in ON_NOT_TLS:
        raise table.error("on_not_tls", f"must be one of {', '.join(ON_NOT_TLS)}")
    timeout = table.number("client_hello_timeout", default=5.0, minimum=0.001)
    block_quic = table.get("block_quic", True, bool)
    policy = _tls_policy(table.table("tls"))
    return TLSPortConfig(
        policy=policy, on_not_tls=on_not_tls, client_hello_timeout=timeout, block_quic=block_quic
    )


def _tls_policy(table: _Table | None) -> TLSPolicy:
    if table is None:
        return TLSPolicy()
    default = table.action("default", "splice")
    no_sni = table.action("no_sni", default)
    raw_rules = table.get("rule", [], list)
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"{table._prefix}.rule[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{table._path}: {where}: must be a table ([[port.tls.rule]])")
        rule = _Table(raw, table._path, where)
        action = rule.action("action", None)
        sni = rule.sni_list("sni")
        clients = rule.network_list("clients", ())
        destinations = rule.network_list("destinations", ())
        rule.done()
        rules.append(TLSRule(action=action, sni=sni, clients=clients, destinations=destinations))
    table.done()
    return TLSPolicy(rules=tuple(rules), default=default, no_sni=no_sni)


def _check_ports(ports: tuple[PortConfig, ...], path: str) -> None:
    names: dict[str, int] = {}
    for i, port in enumerate(ports):
        for j, other in enumerate(ports[:i]):
            if not port.listen.overlaps(other.listen):
                continue
            if "tproxy" in (port.mode, other.mode) and port.mode != other.mode:
                raise ConfigError(
                    f"{path}: port[{i}].listen: {port.listen} overlaps port[{j}] ({other.listen});"
                    " a tproxy port may not share its address with another mode:"
                    " it must receive only TPROXY-diverted traffic"
                )
            raise ConfigError(
                f"{path}: port[{i}].listen: {port.listen} duplicates port[{j}] ({other.listen})"
            )
        if port.name in names:
            raise ConfigError(
                f"{path}: port[{i}].name: {port.name!r} is already used by"
                f" port[{names[port.name]}]; names label metrics and must be unique"
            )
        names[port.name] = i


def _check_metrics_listen(
    listen: ListenAddress | None, ports: tuple[PortConfig, ...], path: str
) -> None:
    if listen is None:
        return
    for i, port in enumerate(ports):
        if listen.overlaps(port.listen):
            raise ConfigError(
                f"{path}: metrics.listen: {listen} is also port[{i}]'s address"
                f" ({port.listen}); the metrics listener needs an address of its own"
            )


def _timeouts(table: _Table | None) -> Timeouts:
    if table is None:
        return Timeouts()
    values = {
        field.name: table.number(field.name, default=field.default, minimum=0.001)
        for field in attrs.fields(Timeouts)
    }
    table.done()
    return Timeouts(**values)


def _limits(table: _Table | None) -> Limits:
    if table is None:
        return Limits()
    values = {
        field.name: table.integer(
            field.name,
            default=field.default,
            minimum=_LIMIT_RANGES[field.name][0],
            maximum=_LIMIT_RANGES[field.name][1],
        )
        for field in attrs.fields(Limits)
    }
    table.done()
    return Limits(**values)


def parse_address(text: str) -> ListenAddress:
    """
    Parse C{"host:port"}, C{"[v6]:port"} or a bare port number (which means
    all addresses, both families).  Raises C{ValueError} with a reason.
    """
    text = text.strip()
    if text.isdigit():
        host, port_text = "::", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("an IPv6 address must be written as [address]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("must be host:port, [ipv6]:port or a port number")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (host names are not accepted)") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} must be a number from 1 to 65535")
    return ListenAddress(host=str(address), port=int(port_text))


_TYPE_NAMES = {str: "a string", bool: "true or false", list: "a list", int: "an integer"}


class _Table:
    """A TOML table being read: remembers which keys were used, to reject unknown ones."""

    def __init__(self, data: Mapping[str, Any], path: str, prefix: str) -> None:
        self._data = data
        self._path = path
        self._prefix = prefix
        self._used: set[str] = set()

    def error(self, key: str, reason: str) -> ConfigError:
        where = f"{self._prefix}.{key}" if self._prefix else key
        return ConfigError(f"{self._path}: {where}: {reason}")

    def get(self, key: str, default: Any, kind: type) -> Any:
        self._used.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        # bool is an int in Python; a TOML `true` is never a valid number here.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(key, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, not {value!r}")
        return value

    def integer(self, key: str, *, default: int, minimum: int, maximum: int) -> int:
        value = self.get(key, default, int)
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be from {minimum} to {maximum}, not {value}")
        return value

    def number(self, key: str, *, default: float, minimum: float) -> float:
        self._used.add(key)
        value = self._data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number of seconds, not {value!r}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return float(value)

    def table(self, key: str) -> _Table | None:
        value = self.get(key, None, dict)
        if value is None:
            return None
        return _Table(value, self._path, f"{self._prefix}.{key}" if self._prefix else key)

    def address(self, key: str, default: str | None = None) -> ListenAddress:
        text = self.get(key, default, str)
        if text is None:
            raise self.error(key, 'is required, e.g. "0.0.0.0:3128" or "[::]:3129"')
        try:
            return parse_address(text)
        except ValueError as e:
            raise self.error(key, f"{text!r}: {e}") from None

    def _list(self, key: str, default: tuple[Any, ...], item: Callable[[Any], Any]) -> tuple:
        raw = self.get(key, None, list)
        if raw is None:
            return tuple(item(v) for v in default)
        result = []
        for i, value in enumerate(raw):
            try:
                result.append(item(value))
            except (TypeError, ValueError) as e:
                raise self.error(f"{key}[{i}]", str(e)) from None
        return tuple(result)

    def network_list(self, key: str, default: tuple[str, ...]) -> tuple[IPNetwork, ...]:
        def network(value: Any) -> IPNetwork:
            if not isinstance(value, str):
                raise TypeError(f'must be a network such as "192.168.0.0/16", not {value!r}')
            try:
                return ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f'{value!r} is not an IP network such as "10.0.0.0/8"') from None

        return self._list(key, default, network)

    def destination_list(self, key: str, *, allow: bool) -> tuple[DestinationRule, ...]:
        def rule(value: Any) -> DestinationRule:
            if not isinstance(value, str):
                raise TypeError(f'must be a string such as "203.0.113.0/24:80,443", not {value!r}')
            return parse_destination(value, allow=allow)

        return self._list(key, (), rule)

    def action(self, key: str, default: str | None) -> str:
        value = self.get(key, default, str)
        if value is None:
            raise self.error(key, f"is required; one of {', '.join(ACTIONS)}")
        if value not in ACTIONS:
            raise self.error(key, f"must be one of {', '.join(ACTIONS)}, not {value!r}")
        return value

    def sni_list(self, key: str) -> tuple[str, ...]:
        def name(value: Any) -> str:
            if not isinstance(value, str):
                raise TypeError(f'must be a server name such as "example.com", not {value!r}')
            text = value.lower().rstrip(".")
            bare = text[1:] if text.startswith(".") else text
            labels = bare.split(".")
            if not bare or any(
                not label or not all(c.isalnum() or c in "-_" for c in label) for label in labels
            ):
                raise ValueError(
                    f'{value!r} is not a server name: "example.com" (that name) or'
                    ' ".example.com" (it and every name below it)'
                )
            return text

        return self._list(key, (), name)

    def port_list(
        self, key: str, default: tuple[int, ...], *, only_for: str, mode: str
    ) -> tuple[int, ...]:
        if key in self._data and mode != only_for:
            raise self.error(key, f"only applies to {only_for} ports, this port's mode is {mode}")

        def port(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"must be a port number from 1 to 65535, not {value!r}")
            return value

        return self._list(key, default, port)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            allowed = ", ".join(sorted(self._used))
            raise self.error(unknown[0], f"unknown key (allowed here: {allowed})")


def with_workers(config: Config, workers: int) -> Config:
    """The same configuration with C{workers} overridden (the --workers flag)."""
    return attrs.evolve(config, workers=workers)


def with_identity(config: Config, user: str, group: str | None) -> Config:
    """The same configuration with the workers' user and group set."""
    return attrs.evolve(config, user=user, group=group)


# --- where the configuration is looked for ----------------------------------------------

SYSTEM_PATH = "/etc/tproxy-twist/tproxy.toml"
# A checkout's sample, for running from the source tree.
_CHECKOUT_PATH = str(Path(__file__).resolve().parents[1] / "etc" / "tproxy.toml")


def default_paths() -> tuple[str, ...]:
    """
    Where C{twistd tproxy} and C{tproxy-twist} look for the configuration
    when C{--config} is not given, in order: the installed path, then
    C{./etc/tproxy.toml} and the source checkout's sample (run from a checkout).
    """
    return tuple(dict.fromkeys((SYSTEM_PATH, "etc/tproxy.toml", _CHECKOUT_PATH)))


def load_default() -> Config:
    """
    L{load} the first of L{default_paths} that exists.  When none does, the
    L{ConfigError} names every path tried and C{--config}.
    """
    for candidate in default_paths():
        if os.path.isfile(candidate):
            return load(candidate)
    raise ConfigError(
        f"no configuration file: tried {', '.join(default_paths())}; give one with --config FILE"
    )
