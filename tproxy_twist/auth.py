"""
Proxy authentication on forward ports: HTTP Basic (RFC 9110 11.7, RFC 7617)
against an htpasswd file of bcrypt entries, as written by C{htpasswd -B}
(Squid: C{auth_param basic program basic_ncsa_auth /etc/squid/passwd}).

bcrypt is slow on purpose (a few to hundreds of milliseconds per check), so:

  - checks run in a small thread pool of their own (L{BcryptPool}), never on
    the reactor thread and never in the reactor's default pool, which
    resolves host names; its queue is bounded, and beyond it a request gets
    503 at once instead of waiting;
  - a verified C{user:password} is remembered for C{credentials_ttl}
    seconds (L{CredentialCache}, keyed by a keyed hash: no password is kept);
  - wrong passwords are limited per client address (L{FailureLimiter}, a
    token bucket: C{max_failures} in a burst, refilled over
    C{failure_window} seconds; IPv6 clients count per /64).  Beyond the
    limit a request whose credentials are not already known good gets 429
    with C{Retry-After}, and costs no bcrypt check: a password-guessing
    client cannot take the pool away from the others.

The file is read with the configuration (L{tproxy_twist.config}), so a
reload (SIGHUP) reads it again, and a broken file refuses the reload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import bcrypt
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .logthrottle import LogThrottle

if TYPE_CHECKING:
    from .config import AuthConfig

__all__ = [
    "AuthResult",
    "Authenticator",
    "BcryptPool",
    "CredentialCache",
    "FailureLimiter",
    "HtpasswdError",
    "parse_basic",
    "read_htpasswd",
]

log = Logger()

# $2y$ (htpasswd -B), $2b$ and $2a$: cost, 22 characters of salt, 31 of hash.
_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt uses the first 72 bytes of a password (Apache's htpasswd too); the
# bcrypt package refuses longer ones instead of truncating.
_BCRYPT_MAX_PASSWORD = 72
_MAX_USER = 255
_MAX_PASSWORD = 1024


class HtpasswdError(ValueError):
    """An htpasswd file the proxy cannot use; the message names the line."""


def read_htpasswd(path: str) -> tuple[tuple[str, bytes], ...]:
    """
    The C{(user, bcrypt hash)} entries of an htpasswd file.  Blank lines and
    lines starting with C{#} are skipped.  Raises L{HtpasswdError} for any
    other line that is not C{user:bcrypt-hash}, for a non-bcrypt hash (MD5
    C{$apr1$}, C{{SHA}}, crypt: use C{htpasswd -B}) and for a user listed
    twice; C{OSError} when the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    entries: list[tuple[str, bytes]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user_bytes, colon, hashed = line.partition(b":")
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise HtpasswdError(f"{path} line {number}: the user name is not UTF-8") from None
        if not colon or not user:
            raise HtpasswdError(f"{path} line {number}: not user:hash")
        if not _BCRYPT.fullmatch(hashed):
            raise HtpasswdError(
                f"{path} line {number}: user {user!r} does not have a bcrypt hash;"
                " only bcrypt entries are accepted (create them with htpasswd -B)"
            )
        if user in seen:
            raise HtpasswdError(
                f"{path} line {number}: user {user!r} is already on line {seen[user]}"
            )
        seen[user] = number
        entries.append((user, hashed))
    return tuple(entries)


def parse_basic(value: bytes | None) -> tuple[str, bytes] | None:
    """
    C{(user, password)} from a C{Proxy-Authorization: Basic …} value, or
    C{None} when there is none or it is not valid Basic credentials.
    """
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user_bytes, colon, password = decoded.partition(b":")
    if not colon or not user_bytes or len(user_bytes) > _MAX_USER:
        return None
    if len(password) > _MAX_PASSWORD:
        return None
    try:
        user = user_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not user.isprintable():
        return None
    return user, password


@attrs.frozen
class AuthResult:
    """
    The verdict on one request's credentials.  C{status} is 0 when the
    request may go on (C{user} says who it is), else the answer to send:
    407 (missing or wrong credentials), 429 (too many wrong passwords from
    this address; C{retry_after} seconds) or 503 (the pool is full), with
    C{fields} added to it (C{Proxy-Authenticate}, C{Retry-After}).
    """

    status: int
    reason: str
    user: str | None = None
    retry_after: int = 0
    metric: str | None = None  # the tproxy_rejected_total reason
    fields: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == 0


def _accepted(user: str) -> AuthResult:
    return AuthResult(0, "authenticated", user)


_BUSY = AuthResult(
    503, "too many password checks in progress; try again", None, 1, "limit",
    ((b"Retry-After", b"1"),),
)  # fmt: skip


class CredentialCache:
    """
    Recently checked credentials, good and bad, for C{ttl} seconds.  Keys
    are HMAC-SHA256 of C{user NUL password} under a random key made per
    process: what is kept cannot be turned back into a password.  At most
    C{size} entries; the oldest go first.
    """

    def __init__(self, clock: IReactorTime, ttl: float, size: int = 10_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._secret = os.urandom(32)
        self._entries: dict[bytes, tuple[float, bool]] = {}

    def key(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._secret, user.encode() + b"\0" + password, hashlib.sha256).digest()

    def get(self, key: bytes) -> bool | None:
        """C{True}/C{False} for credentials checked within the TTL, else C{None}."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, good = entry
        if self._clock.seconds() >= expires:
            del self._entries[key]
            return None
        return good

    def put(self, key: bytes, good: bool) -> None:
        if self._ttl <= 0:
            return
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (self._clock.seconds() + self._ttl, good)

    def __len__(self) -> int:
        return len(self._entries)


def client_key(client_ip: str) -> str:
    """Whom failures are counted for: the IPv4 address, or the IPv6 /64."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailureLimiter:
    """
    A token bucket per client key: C{burst} wrong passwords at once, one
    more every C{window / burst} seconds.  A check takes a token before it
    runs (so concurrent guesses cannot overdraw) and gives it back when the
    password was right.  At most C{size} buckets; full ones are forgotten
    first.
    """

    def __init__(self, clock: IReactorTime, burst: int, window: float, size: int = 10_000):
        self._clock = clock
        self._burst = float(burst)
        self._rate = burst / window  # tokens per second
        self._size = size
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self._burst
        tokens, at = entry
        return min(self._burst, tokens + (now - at) * self._rate)

    def take(self, key: str) -> float:
        """
        Take a token: 0.0 when there was one, else the seconds until there
        will be one (and nothing is taken).
        """
        now = self._clock.seconds()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self._rate
        if key not in self._buckets and len(self._buckets) >= self._size:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def give_back(self, key: str) -> None:
        now = self._clock.seconds()
        tokens = self._tokens(key, now) + 1.0
        if tokens >= self._burst:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = (tokens, now)

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        for key in [k for k in buckets if self._tokens(k, now) >= self._burst]:
            del buckets[key]
        while len(buckets) >= self._size:
            del buckets[next(iter(buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class BcryptPool:
    """
    A thread pool that only checks passwords: C{threads} threads, at most
    C{max_queued} checks waiting or running.  L{submit} returns C{None}
    when it is full.  bcrypt releases the GIL while it hashes, so the
    reactor thread keeps running meanwhile.
    """

    def __init__(self, reactor: Any, threads: int = 2, max_queued: int = 64) -> None:
        from twisted.python.threadpool import ThreadPool

        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="bcrypt")
        self._max = max_queued
        self.pending = 0
        self._trigger = None

    def start(self) -> None:
        self._pool.start()
        # Stop the threads with the reactor, or interpreter exit waits for them.
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._pool.stop()

    def submit(self, function: Callable[..., Any], *args: Any) -> defer.Deferred | None:
        from twisted.internet.threads import deferToThreadPool

        if self.pending >= self._max:
            return None
        self.pending += 1
        d = deferToThreadPool(self._reactor, self._pool, function, *args)

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        return d.addBoth(done)


def _check_password(password: bytes, hashed: bytes) -> bool:
    """Runs in a pool thread."""
    return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)


class Authenticator:
    """
    Decides whether a request's C{Proxy-Authorization} lets it through.
    One per forward port with C{auth}; C{check} is called on the reactor
    thread and returns a Deferred that fires with an L{AuthResult} (at once
    when no bcrypt check is needed).
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: IReactorTime,
        pool: Any,
        check_password: Callable[[bytes, bytes], bool] = _check_password,
    ) -> None:
        self.config = config
        self.realm = config.realm
        self._users = dict(config.users)
        # An unknown user costs the same check as a known one (no user
        # enumeration by timing); its result is ignored.
        self._decoy = config.users[0][1] if config.users else None
        self._pool = pool
        self._check_password = check_password
        self.cache = CredentialCache(clock, config.credentials_ttl)
        self.limiter = FailureLimiter(clock, config.max_failures, config.failure_window)
        self._throttle = LogThrottle(clock)
        challenge = (self.challenge(),)
        self._missing = AuthResult(407, "proxy authentication required", metric="auth",
                                   fields=challenge)  # fmt: skip
        self._wrong = AuthResult(407, "wrong user name or password", metric="auth",
                                 fields=challenge)  # fmt: skip

    def challenge(self) -> tuple[bytes, bytes]:
        """The C{Proxy-Authenticate} field for a 407."""
        return b"Proxy-Authenticate", b'Basic realm="%s", charset="UTF-8"' % self.realm.encode()

    def check(self, client_ip: str, proxy_authorization: bytes | None) -> defer.Deferred:
        credentials = parse_basic(proxy_authorization)
        if credentials is None:
            return defer.succeed(self._missing)
        user, password = credentials
        key = self.cache.key(user, password)
        known = self.cache.get(key)
        if known is not None:
            return defer.succeed(_accepted(user) if known else self._wrong)
        client = client_key(client_ip)
        wait = self.limiter.take(client)
        if wait:
            self._throttle.emit(
                log.warn,
                "limit",
                "too many wrong passwords from {client}: answering 429 without checking",
                client=client,
            )
            seconds = math.ceil(wait)
            return defer.succeed(
                AuthResult(
                    429,
                    f"too many wrong passwords from {client}; try again in {seconds} s",
                    None,
                    seconds,
                    "limit",
                    ((b"Retry-After", b"%d" % seconds),),
                )
            )
        hashed = self._users.get(user)
        target = hashed if hashed is not None else self._decoy
        if target is None:  # an empty file: nobody can log in
            return defer.succeed(self._wrong)
        d = self._pool.submit(self._check_password, password, target)
        if d is None:
            self.limiter.give_back(client)
            return defer.succeed(_BUSY)

        def verdict(good: bool) -> AuthResult:
            good = bool(good) and hashed is not None
            self.cache.put(key, good)
            if good:
                self.limiter.give_back(client)
                return _accepted(user)
            self._throttle.emit(
                log.info, "wrong", "wrong password for {user!r} from {client}", user=user,
                client=client_ip,
            )  # fmt: skip
            return self._wrong

        def failed(failure) -> AuthResult:
            log.failure("checking a password failed", failure)
            return self._wrong

        return d.addCallbacks(verdict, failed)
