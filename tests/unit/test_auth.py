"""Proxy authentication: Basic credentials, bcrypt off the reactor, cache, failure limit."""

import base64

import bcrypt
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from tproxy_twist.auth import (
    Authenticator,
    BcryptPool,
    CredentialCache,
    FailureLimiter,
    client_key,
    parse_basic,
)
from tproxy_twist.config import AuthConfig

ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4))
BOB = b"$2y$" + bcrypt.hashpw(b"builder", bcrypt.gensalt(4))[4:]  # htpasswd -B's prefix


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class FakePool:
    """Holds submitted checks until the test runs them; at most C{size} at once."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.jobs: list[tuple[defer.Deferred, object, tuple]] = []

    def submit(self, function, *args):
        if len(self.jobs) >= self.size:
            return None
        d = defer.Deferred()
        self.jobs.append((d, function, args))
        return d

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for d, function, args in jobs:
            d.callback(function(*args))


class Harness:
    def __init__(self, **config) -> None:
        self.clock = Clock()
        self.pool = FakePool(config.pop("pool_size", 64))
        self.auth = Authenticator(
            AuthConfig(htpasswd="/x", users=(("alice", ALICE), ("bob", BOB)), **config),
            clock=self.clock,
            pool=self.pool,
        )

    def check(self, value: bytes | None, client: str = "198.51.100.2", *, run: bool = True):
        results = []
        self.auth.check(client, value).addCallback(results.append)
        if run:
            self.pool.run_all()
        return results[0] if results else None


@pytest.mark.parametrize(
    "value, expected",
    [
        (basic("alice", "wonderland"), ("alice", b"wonderland")),
        (b"basic " + base64.b64encode(b"al:ice:pass:word"), ("al", b"ice:pass:word")),
        (b"Basic  " + base64.b64encode(b"alice:"), ("alice", b"")),
        (basic("zoë", "pw"), ("zoë", b"pw")),
        (None, None),
        (b"Bearer abc", None),
        (b"Basic !!!", None),
        (b"Basic " + base64.b64encode(b"no-colon"), None),
        (b"Basic " + base64.b64encode(b":password"), None),
        (b"Basic " + base64.b64encode(b"\xff\xfe:pw"), None),
        (b"Basic " + base64.b64encode(b"a\nb:pw"), None),
        (b"Basic " + base64.b64encode(b"a:" + b"x" * 2000), None),
    ],
)
def test_basic_credentials_parse_strictly(value, expected):
    assert parse_basic(value) == expected


def test_right_password_lets_the_request_through_with_its_user():
    h = Harness()
    result = h.check(basic("alice", "wonderland"))
    assert result.ok and result.user == "alice"
    assert h.check(basic("bob", "builder")).user == "bob"  # $2y$ as htpasswd -B writes


def test_missing_or_other_scheme_credentials_get_407_without_a_check():
    h = Harness()
    for value in (None, b"Digest username=alice", b"Basic garbage"):
        result = h.check(value, run=False)
        assert (result.status, result.metric) == (407, "auth")
    assert h.pool.jobs == []


def test_wrong_password_and_unknown_user_get_407_after_a_check_off_the_reactor():
    h = Harness()
    assert h.check(basic("alice", "nope"), run=False) is None  # waits for the pool
    assert len(h.pool.jobs) == 1
    h.pool.run_all()
    assert h.check(basic("alice", "nope")).status == 407
    # An unknown user costs a check too (no user enumeration by timing) and fails.
    assert h.check(basic("mallory", "wonderland"), run=False) is None
    assert len(h.pool.jobs) == 1
    h.pool.run_all()


def test_unknown_user_with_another_users_password_is_refused():
    h = Harness()
    assert h.check(basic("mallory", "wonderland")).status == 407


def test_verified_credentials_are_remembered_for_the_ttl_only():
    h = Harness(credentials_ttl=30.0)
    assert h.check(basic("alice", "wonderland")).ok
    assert h.check(basic("alice", "wonderland"), run=False).ok  # no pool needed
    h.clock.advance(29.9)
    assert h.check(basic("alice", "wonderland"), run=False).ok
    h.clock.advance(0.2)
    assert h.check(basic("alice", "wonderland"), run=False) is None  # checked again
    assert len(h.pool.jobs) == 1


def test_the_cache_keeps_no_password():
    h = Harness()
    h.check(basic("alice", "wonderland"))
    h.check(basic("alice", "wrong-one"))
    stored = repr(h.auth.cache._entries)
    assert "wonderland" not in stored and "wrong-one" not in stored
    assert len(h.auth.cache) == 2


def test_a_client_guessing_passwords_gets_429_without_any_check():
    h = Harness(max_failures=3, failure_window=60.0)
    for i in range(3):
        assert h.check(basic("alice", f"guess{i}")).status == 407
    result = h.check(basic("alice", "guess3"), run=False)
    assert (result.status, result.metric, result.retry_after) == (429, "limit", 20)
    assert h.pool.jobs == []
    # Other clients are not affected, nor are known-good credentials from the same one.
    assert h.check(basic("bob", "builder"), client="198.51.100.3").ok
    # One allowance comes back every window / max_failures seconds.
    h.clock.advance(20)
    assert h.check(basic("alice", "guess4")).status == 407
    assert h.check(basic("alice", "guess5"), run=False).status == 429


def test_known_good_credentials_pass_while_the_same_address_is_limited():
    h = Harness(max_failures=2)
    assert h.check(basic("alice", "wonderland")).ok
    h.check(basic("alice", "x"))
    h.check(basic("alice", "y"))
    assert h.check(basic("alice", "z"), run=False).status == 429
    assert h.check(basic("alice", "wonderland"), run=False).ok


def test_concurrent_guesses_cannot_overdraw_the_allowance():
    h = Harness(max_failures=3)
    for i in range(10):
        h.check(basic("alice", f"guess{i}"), run=False)
    assert len(h.pool.jobs) == 3  # the other 7 were answered 429 at once


def test_a_right_password_gives_its_allowance_back():
    h = Harness(max_failures=2)
    h.check(basic("alice", "x"))
    for _ in range(5):
        assert h.check(basic("bob", "builder")).ok
        h.auth.cache._entries.clear()
    assert h.check(basic("alice", "y")).status == 407  # still one left


def test_ipv6_clients_are_limited_per_64():
    assert client_key("2001:db8:1::2") == client_key("2001:db8:1::ffff:3") == "2001:db8:1::/64"
    assert client_key("::ffff:198.51.100.2") == "198.51.100.2"
    h = Harness(max_failures=1)
    h.check(basic("alice", "x"), client="2001:db8:1::2")
    assert h.check(basic("alice", "y"), client="2001:db8:1::3", run=False).status == 429
    assert h.check(basic("alice", "y"), client="2001:db8:2::3", run=False) is None


def test_a_full_pool_answers_503_at_once_and_charges_nothing():
    h = Harness(pool_size=1, max_failures=5)
    assert h.check(basic("alice", "a"), run=False) is None
    result = h.check(basic("alice", "b"), run=False)
    assert (result.status, result.metric) == (503, "limit")
    h.pool.run_all()
    for guess in "cdef":
        assert h.check(basic("alice", guess)).status == 407
    assert h.check(basic("alice", "g"), run=False).status == 429  # 5 failures, not 6


def test_refusals_carry_the_fields_their_answer_needs():
    h = Harness(realm="lab", max_failures=1, pool_size=1)
    challenge = (b"Proxy-Authenticate", b'Basic realm="lab", charset="UTF-8"')
    assert h.check(None).fields == (challenge,)
    assert h.check(basic("alice", "x")).fields == (challenge,)
    assert h.check(basic("alice", "y"), run=False).fields == ((b"Retry-After", b"60"),)
    h.check(basic("bob", "a"), client="192.0.2.1", run=False)  # fills the pool
    busy = h.check(basic("bob", "b"), client="192.0.2.2", run=False)
    assert (busy.status, busy.fields) == (503, ((b"Retry-After", b"1"),))


def test_the_challenge_names_the_realm():
    h = Harness(realm="Staff only")
    field = (b"Proxy-Authenticate", b'Basic realm="Staff only", charset="UTF-8"')
    assert h.auth.challenge() == field


def test_passwords_longer_than_72_bytes_are_checked_as_htpasswd_does():
    long = "p" * 100
    hashed = bcrypt.hashpw(long[:72].encode(), bcrypt.gensalt(4))
    clock = Clock()
    pool = FakePool()
    config = AuthConfig(htpasswd="/x", users=(("carol", hashed),))
    auth = Authenticator(config, clock=clock, pool=pool)
    results = []
    auth.check("198.51.100.2", basic("carol", long)).addCallback(results.append)
    pool.run_all()
    assert results[0].ok


def test_limiter_forgets_full_buckets_first_when_it_is_full():
    clock = Clock()
    limiter = FailureLimiter(clock, burst=2, window=10.0, size=3)
    limiter.take("a")
    clock.advance(100)  # "a" is full again
    limiter.take("b")
    limiter.take("c")
    limiter.take("d")
    assert len(limiter) == 3
    assert limiter.take("b") == 0.0  # b still had one left
    assert limiter.take("b") > 0


def test_cache_is_bounded():
    cache = CredentialCache(Clock(), ttl=60, size=3)
    keys = [cache.key("u", str(i).encode()) for i in range(5)]
    for key in keys:
        cache.put(key, True)
    assert len(cache) == 3
    assert cache.get(keys[0]) is None and cache.get(keys[4]) is True


def test_bcrypt_pool_runs_checks_in_its_own_threads_and_bounds_its_queue():
    import threading
    import time

    class Reactor:
        """Runs callFromThread callbacks when the test asks."""

        def __init__(self):
            self.calls = []
            self.lock = threading.Lock()

        def callFromThread(self, f, *args, **kw):
            with self.lock:
                self.calls.append((f, args, kw))

        def addSystemEventTrigger(self, *args):
            return "trigger"

        def removeSystemEventTrigger(self, trigger):
            pass

    fake = Reactor()
    pool = BcryptPool(fake, threads=1, max_queued=2)
    pool.start()
    try:
        gate = threading.Event()
        names = []

        def job():
            gate.wait(10)
            names.append(threading.current_thread().name)
            return True

        first = pool.submit(job)
        second = pool.submit(job)
        assert pool.submit(job) is None  # the queue is full
        gate.set()
        results = []
        first.addCallback(results.append)
        second.addCallback(results.append)
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            with fake.lock:
                calls, fake.calls = fake.calls, []
            for f, args, kw in calls:
                f(*args, **kw)
        assert results == [True, True]
        assert pool.pending == 0
        assert names and all("bcrypt" in name for name in names)
    finally:
        pool.stop()
