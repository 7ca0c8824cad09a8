"""Resolve, check, connect: every address a name resolves to is checked, literals only leave."""

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock

from tproxy_twist import config as C
from tproxy_twist.destinations import DestinationPolicy
from tproxy_twist.resolver import DestinationRefused, DestinationResolver, Resolved

OWN = frozenset({"198.51.100.1", "203.0.113.1", "2001:db8:2::1"})


class FakeNames:
    """An IHostnameResolver answering from a dict; records what it was asked."""

    def __init__(self, names: dict[str, list[str]], *, defer_answers: bool = False) -> None:
        self.names = names
        self.asked: list[tuple[str, int]] = []
        self.pending: list = []
        self.defer_answers = defer_answers

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):  # fmt: skip
        self.asked.append((hostName, portNumber))
        receiver.resolutionBegan(None)

        def answer():
            for address in self.names.get(hostName, []):
                kind = IPv6Address if ":" in address else IPv4Address
                receiver.addressResolved(kind("TCP", address, portNumber))
            receiver.resolutionComplete()

        if self.defer_answers:
            self.pending.append(answer)
        else:
            answer()
        return receiver


NAMES = {
    "origin.example": ["203.0.113.2", "2001:db8:2::2"],
    "localhost": ["127.0.0.1", "::1"],
    "router.example": ["198.51.100.1"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": ["203.0.113.2", "127.0.0.1"],
    "mapped.example": ["::ffff:203.0.113.1"],
    "dup.example": ["203.0.113.2", "203.0.113.2"],
    "nothing.example": [],
}


def resolver(policy=None, *, builtin=True, names=None):
    policy = policy or DestinationPolicy()
    fake = names or FakeNames(NAMES)
    return DestinationResolver(fake, policy, own=OWN, builtin=builtin), fake


def outcome(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_a_name_resolves_to_checked_literals_in_order():
    r, _ = resolver()
    assert outcome(r.resolve("origin.example", 80)) == Resolved(
        "origin.example", 80, ("203.0.113.2", "2001:db8:2::2")
    )
    assert outcome(r.resolve("dup.example", 80)).addresses == ("203.0.113.2",)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("localhost", "127.0.0.1 is a loopback address"),
        ("router.example", "198.51.100.1 is an address of the proxy's host"),
        ("metadata.example", "169.254.169.254 is a link-local address"),
        ("mixed.example", "127.0.0.1 is a loopback address"),  # one refused address is enough
        ("mapped.example", "203.0.113.1 is an address of the proxy's host"),
    ],
)
def test_a_name_resolving_to_a_refused_address_is_refused(name, fragment):
    r, _ = resolver()
    failure = outcome(r.resolve(name, 80))
    assert failure.check(DestinationRefused)
    assert failure.value.decision.reason.startswith(f"{name} resolves to a refused address: ")
    assert fragment in failure.value.decision.reason


@pytest.mark.parametrize("literal", ["127.0.0.1", "[::1]", "::ffff:127.0.0.1", "[fe80::1%eth0]"])
def test_literals_are_checked_without_asking_the_resolver(literal):
    r, names = resolver()
    assert outcome(r.resolve(literal, 443)).check(DestinationRefused)
    assert names.asked == []


def test_an_allowed_literal_is_connected_as_written_without_brackets():
    r, names = resolver()
    assert outcome(r.resolve("[2001:db8:2::2]", 80)).addresses == ("2001:db8:2::2",)
    assert outcome(r.resolve("::ffff:203.0.113.2", 80)).addresses == ("203.0.113.2",)
    assert names.asked == []


def test_a_name_that_does_not_resolve_is_a_lookup_error():
    r, _ = resolver()
    assert outcome(r.resolve("nothing.example", 80)).check(DNSLookupError)
    assert outcome(r.resolve("unknown.example", 80)).check(DNSLookupError)


def test_port_rules_apply_to_the_resolved_address():
    rules = DestinationPolicy(allow=(C.parse_destination("203.0.113.0/24:80", allow=True),))
    r, _ = resolver(rules)
    assert outcome(r.resolve("dup.example", 80)).addresses == ("203.0.113.2",)
    failure = outcome(r.resolve("dup.example", 8080))
    assert "203.0.113.2:8080 is not in this port's allow_destinations" in str(failure.value)
    # origin.example also has an IPv6 address, which the allow list does not name.
    assert outcome(r.resolve("origin.example", 80)).check(DestinationRefused)


def test_without_builtin_refusals_only_the_rules_apply():
    r, _ = resolver(builtin=False)
    assert outcome(r.resolve("localhost", 80)).addresses == ("127.0.0.1", "::1")
    assert not r.checks_anything
    assert resolver()[0].checks_anything


def test_the_check_happens_when_the_answer_arrives():
    names = FakeNames(NAMES, defer_answers=True)
    r, _ = resolver(names=names)
    d = r.resolve("localhost", 80)
    results = []
    d.addBoth(results.append)
    assert results == []
    names.pending.pop()()
    assert results[0].check(DestinationRefused)


def test_a_name_that_takes_too_long_to_resolve_fails_and_the_late_answer_is_dropped():
    names = FakeNames(NAMES, defer_answers=True)
    clock = Clock()
    r = DestinationResolver(names, DestinationPolicy(), own=OWN, builtin=True, clock=clock,
                            timeout=5.0)  # fmt: skip
    results = []
    r.resolve("origin.example", 80).addBoth(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    assert results[0].check(DNSLookupError)
    assert "took longer than 5 s" in str(results[0].value)
    names.pending.pop()()  # getaddrinfo answers at last: nothing happens
    assert len(results) == 1
