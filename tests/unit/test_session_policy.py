"""
The proxy policy in the session and its adapter (issue 11): every request
on a port with auth is authenticated before its upstream is used, refused
destinations are 403s, Via can be off, the user reaches the record, and the
adapter resolves, checks and connects to a checked IP literal.
"""

from __future__ import annotations

import bcrypt
import pytest
from prometheus_client import CollectorRegistry
from test_session import CLIENT_IP, OK, FakeIO, Rig, head_fields
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.auth import Authenticator, AuthResult
from tproxy_twist.destinations import Decision
from tproxy_twist.http import policy
from tproxy_twist.http.relay import ProxyFactory, RelaySettings
from tproxy_twist.http.session import Session, State
from tproxy_twist.metrics import PortMetrics
from tproxy_twist.resolver import DestinationRefused
from tproxy_twist.testing import FakeConnect, FakeTransport, tcp_address

FORWARD_ALLOW = 'allow = ["198.51.100.0/24"]\n'
GET_ABS = b"GET http://203.0.113.2/a HTTP/1.1\r\nHost: 203.0.113.2\r\n"
CREDENTIALS = b"Basic YWxpY2U6d29uZGVybGFuZA=="  # alice:wonderland
CHALLENGE = ((b"Proxy-Authenticate", b'Basic realm="lab"'),)


def request(*fields: bytes) -> bytes:
    return GET_ABS + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


class AuthIO(FakeIO):
    """FakeIO that records authentication checks; answers them now when C{answer} is set."""

    def __init__(self, answer: AuthResult | None = None) -> None:
        super().__init__()
        self.checks: list = []
        self.answer = answer
        self.session: Session | None = None

    def authenticate(self, link, client_ip, credentials) -> None:
        self.checks.append((link, client_ip, credentials))
        if self.answer is not None:
            self.session.authenticated(link, self.answer)


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_bytes(b"alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)) + b"\n")
    return path


def auth_rig(htpasswd, answer: AuthResult | None = None) -> Rig:
    rig = Rig("forward", FORWARD_ALLOW + f'auth = {{ htpasswd = "{htpasswd}", realm = "lab" }}\n')
    rig.io = AuthIO(answer)
    rig.session = rig.io.session = Session(rig.config, rig.io, rig.clock, CLIENT_IP, None)
    return rig


ALICE = AuthResult(0, "authenticated", "alice")
WRONG = AuthResult(407, "wrong user name or password", metric="auth", fields=CHALLENGE)


def test_a_request_waits_in_connecting_for_its_credentials_then_connects(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: " + CREDENTIALS))
    assert r.state is State.CONNECTING and r.io.connects == []
    [(link, client, credentials)] = r.io.checks
    assert (client, credentials) == (CLIENT_IP, CREDENTIALS)
    r.session.authenticated(link, ALICE)
    assert r.io.connects[-1][1] == ("203.0.113.2", 80)
    r.connect()
    assert b"proxy-authorization" not in r.sent().lower()
    r.answer(OK)
    assert r.received().startswith(b"HTTP/1.1 200 OK")
    [record] = r.io.records
    assert record.user == "alice"


def test_wrong_credentials_get_407_with_the_challenge_and_no_connection(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: Basic bm9wZTpub3Bl"))
    r.session.authenticated(r.io.checks[0][0], WRONG)
    answer = r.received()
    assert answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="lab"\r\n' in answer
    assert b"wrong user name or password" in answer
    assert r.io.connects == [] and r.state is State.LINGER
    [record] = r.io.records
    assert (record.status, record.rejected, record.user, record.result) == (
        407, "auth", None, "TCP_DENIED",
    )  # fmt: skip


def test_too_many_wrong_passwords_get_429_with_retry_after(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: Basic bm9wZTpub3Bl"))
    limited = AuthResult(429, "too many", None, 6, "limit", ((b"Retry-After", b"6"),))
    r.session.authenticated(r.io.checks[0][0], limited)
    answer = r.received()
    assert answer.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 6\r\n" in answer
    assert r.io.records[0].rejected == "limit"


def test_an_answer_given_at_once_goes_on_in_the_same_call(htpasswd):
    r = auth_rig(htpasswd, answer=ALICE)
    body = b"hello"
    r.send(
        b"POST http://203.0.113.2/a HTTP/1.1\r\nHost: 203.0.113.2\r\nContent-Length: 5\r\n"
        b"Proxy-Authorization: " + CREDENTIALS + b"\r\n\r\n" + body
    )
    assert r.state is State.CONNECTING and len(r.io.connects) == 1
    r.connect()
    assert r.sent().endswith(b"\r\n\r\nhello")
    assert r.state is State.AWAITING


def test_every_request_on_a_keep_alive_connection_is_checked_again(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: " + CREDENTIALS))
    r.session.authenticated(r.io.checks[0][0], ALICE)
    link = r.connect()
    r.answer(OK)
    r.received()
    r.send(request())  # no credentials this time, on the same connection
    assert len(r.io.checks) == 2 and r.io.checks[1][2] is None
    sent_before = r.sent(link)
    r.session.authenticated(r.io.checks[1][0], WRONG)
    assert r.received().startswith(b"HTTP/1.1 407 ")
    assert r.sent(link) == sent_before  # the second request never went upstream


def test_a_late_answer_after_the_client_left_changes_nothing(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: " + CREDENTIALS))
    r.session.client_lost()
    r.session.authenticated(r.io.checks[0][0], ALICE)
    assert r.io.connects == [] and r.state is State.CLOSED


def test_a_check_that_never_answers_ends_with_the_idle_deadline(htpasswd):
    r = auth_rig(htpasswd)
    r.send(request(b"Proxy-Authorization: " + CREDENTIALS))
    r.advance(r.timeouts.idle + 0.1)
    assert r.received().startswith(b"HTTP/1.1 504 ")
    r.session.authenticated(r.io.checks[0][0], ALICE)  # too late: ignored
    assert r.io.connects == []


def test_a_refused_destination_is_a_403_with_its_reason():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"GET http://localhost:9464/metrics HTTP/1.1\r\nHost: localhost:9464\r\n\r\n")
    why = "localhost resolves to a refused address: 127.0.0.1 is a loopback address"
    r.session.upstream_failed(r.link(), DestinationRefused(Decision(False, why)))
    answer = r.received()
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert f"destination refused: {why}".encode() in answer
    [record] = r.io.records
    assert (record.rejected, record.upstream_error, record.result) == (
        "destination", None, "TCP_DENIED",
    )  # fmt: skip


def test_a_name_that_does_not_resolve_is_a_502():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"GET http://nowhere.example/ HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
    r.session.upstream_failed(r.link(), DNSLookupError("cannot resolve nowhere.example"))
    answer = r.received()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"cannot connect to nowhere.example:80: the host name does not resolve" in answer
    assert r.io.records[0].upstream_error == "unreachable"


def test_the_record_names_the_address_a_name_was_connected_to():
    r = Rig("forward", FORWARD_ALLOW)
    r.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
    link = r.link()
    assert link.destination == ("origin.example", 80)
    link.address = "203.0.113.2"
    r.connect()
    r.answer(OK)
    [record] = r.io.records
    assert record.destination == ("203.0.113.2", 80)
    assert record.url() == b"http://origin.example/"


def test_via_off_adds_no_via_either_way_and_loops_are_still_refused():
    r = Rig("tproxy", "via = false\n")
    r.send(b"GET / HTTP/1.1\r\nHost: example.com\r\nVia: 1.1 other\r\n\r\n")
    r.connect()
    _, fields = head_fields(r.sent())
    assert b"Via: 1.1 other" in fields and not any(b"router" in f for f in fields)
    r.answer(OK)
    _, fields = head_fields(r.received())
    assert not any(f.lower().startswith(b"via:") for f in fields)
    looped = Rig("tproxy", "via = false\n")
    looped.send(b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 router (tproxy-twist)\r\n\r\n")
    assert looped.received().startswith(b"HTTP/1.1 508 ")


def test_via_on_names_the_pseudonym_both_ways():
    r = Rig("tproxy")
    r.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    r.connect()
    assert b"Via: 1.1 router (tproxy-twist)" in head_fields(r.sent())[1]
    r.answer(OK)
    assert b"Via: 1.1 router (tproxy-twist)" in head_fields(r.received())[1]


def test_upstream_fields_without_via_add_none():
    r = Rig("tproxy")
    r.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    request = r.session._exchange.request
    fields = policy.upstream_fields(
        request, host=None, upgrade=False, via=None, xff_mode="off", client_ip=CLIENT_IP
    )
    assert fields == [(b"Host", b"a")]


# --- the adapter: resolve -> check -> connect, and authentication -----------------------


class FakeNames:
    """An IHostnameResolver answering from a dict."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):  # fmt: skip
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.names.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()
        return receiver


class FakePool:
    def __init__(self) -> None:
        self.jobs = []

    def submit(self, function, *args):
        from twisted.internet import defer

        d = defer.Deferred()
        self.jobs.append((d, function, args))
        return d

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for d, function, args in jobs:
            d.callback(function(*args))


NAMES = {"origin.example": ["203.0.113.2"], "localhost": ["127.0.0.1", "::1"]}
ROUTER = frozenset({"198.51.100.1", "203.0.113.1"})


class Proxy:
    """A forward (or other) port's factory with a fake connector, resolver and clock."""

    def __init__(self, extra: str = "", mode: str = "forward", *, auth_pool=None) -> None:
        listen = "0.0.0.0:3128" if mode == "forward" else "[::]:3129"
        allow = FORWARD_ALLOW if mode == "forward" else ""
        config = C.loads(f'[[port]]\nname = "p"\nlisten = "{listen}"\nmode = "{mode}"\n'
                         + allow + extra)  # fmt: skip
        port = config.ports[0]
        self.clock = Clock()
        self.connect = FakeConnect()
        self.names = FakeNames(NAMES)
        self.clock.nameResolver = self.names
        self.pool = auth_pool or FakePool()
        authenticator = None
        if port.auth is not None:
            authenticator = Authenticator(port.auth, clock=self.clock, pool=self.pool)
        self.factory = ProxyFactory(
            port,
            settings=RelaySettings(config.timeouts, config.limits, pseudonym="router"),
            connect=self.connect,
            clock=self.clock,
            local_addresses=ROUTER,
            metrics=PortMetrics("p", mode, CollectorRegistry()),
            authenticator=authenticator,
        )
        self.protocol = self.factory.buildProtocol(None)
        # A tproxy connection's local address is its original destination.
        host = ("198.51.100.1", 3128) if mode == "forward" else ("203.0.113.2", 80)
        self.transport = FakeTransport(host=tcp_address(*host), peer=tcp_address(CLIENT_IP, 40001))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


def test_the_adapter_connects_to_the_checked_address_never_to_the_name():
    p = Proxy()
    p.send(b"GET http://origin.example:8080/ HTTP/1.1\r\nHost: origin.example:8080\r\n\r\n")
    assert p.names.asked == ["origin.example"]
    attempt = p.connect.last
    assert (attempt.host, attempt.port, attempt.source_ip) == ("203.0.113.2", 8080, None)
    attempt.succeed()
    assert attempt.transport.value().startswith(b"GET / HTTP/1.1\r\nHost: origin.example:8080")


@pytest.mark.parametrize(
    "target",
    [b"http://localhost:9464/metrics", b"http://127.0.0.1:9464/", b"http://[::1]/",
     b"http://198.51.100.1:3128/", b"http://169.254.169.254/"],
)  # fmt: skip
def test_the_adapter_refuses_the_router_itself_with_403_and_no_connection(target):
    p = Proxy()
    p.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert p.connect.attempts == []
    assert p.transport.value().startswith(b"HTTP/1.1 403 Forbidden")
    assert b"destination refused: " in p.transport.value()


def test_the_adapter_refuses_connect_to_a_name_of_the_router():
    p = Proxy()
    p.send(b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n")
    assert p.connect.attempts == []
    assert b"localhost resolves to a refused address" in p.transport.value()


def test_tproxy_ports_without_rules_connect_without_a_check():
    p = Proxy(mode="tproxy")
    p.factory.resolver = None  # never used: nothing to check on this port
    p.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (p.connect.last.host, p.connect.last.port) == ("203.0.113.2", 80)


def test_tproxy_rules_apply_to_the_original_destination():
    p = Proxy('deny_destinations = ["203.0.113.0/24:80"]\n', mode="tproxy")
    p.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.connect.attempts == []
    assert b"203.0.113.2:80 is denied by deny_destinations" in p.transport.value()


def test_the_adapter_authenticates_off_the_reactor_then_relays(htpasswd):
    p = Proxy(f'auth = {{ htpasswd = "{htpasswd}" }}\n')
    p.send(request(b"Proxy-Authorization: " + CREDENTIALS))
    assert p.connect.attempts == [] and len(p.pool.jobs) == 1
    p.pool.run_all()
    assert p.connect.last.host == "203.0.113.2"
    p.connect.last.succeed()
    assert b"Proxy-Authorization" not in p.connect.last.transport.value()


def test_the_adapter_challenges_a_request_without_credentials(htpasswd):
    p = Proxy(f'auth = {{ htpasswd = "{htpasswd}", realm = "Staff" }}\n')
    p.send(request())
    answer = p.transport.value()
    assert answer.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="Staff", charset="UTF-8"' in answer
    assert p.pool.jobs == []
