"""Destination rules: the built-in refusals and allow/deny_destinations, as written."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy_twist import config as C
from tproxy_twist.destinations import (
    DestinationPolicy,
    builtin_refusal,
    check,
    normalize,
)

OWN = frozenset({"198.51.100.1", "203.0.113.1", "2001:db8:1::1", "2001:db8:2::1"})


def policy(deny=(), allow=()) -> DestinationPolicy:
    return DestinationPolicy(
        deny=tuple(C.parse_destination(t, allow=False) for t in deny),
        allow=tuple(C.parse_destination(t, allow=True) for t in allow),
    )


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("febf:ffff::1", "link-local"),
        ("198.51.100.1", "address of the proxy's host"),
        ("::ffff:203.0.113.1", "address of the proxy's host"),
        ("2001:db8:2::1", "address of the proxy's host"),
        ("2001:db8:2:0:0:0:0:1", "address of the proxy's host"),
    ],
)
def test_the_router_itself_and_link_local_are_refused_whatever_the_rules(address, why):
    refusal = builtin_refusal(address, OWN)
    assert refusal is not None and not refusal.allowed
    assert why in refusal.reason
    # An allow rule naming it does not lift the refusal.
    everyone = policy(allow=["*"])
    assert not check(address, 80, everyone, own=OWN, builtin=True).allowed


@pytest.mark.parametrize(
    "address", ["203.0.113.2", "2001:db8:2::2", "::ffff:203.0.113.2", "10.0.0.1", "fec0::1"]
)
def test_other_addresses_pass_the_builtin_refusals(address):
    assert builtin_refusal(address, OWN) is None
    assert check(address, 80, DestinationPolicy(), own=OWN, builtin=True).allowed


def test_tproxy_ports_skip_the_builtin_refusals_but_keep_their_rules():
    deny_local = policy(deny=["169.254.0.0/16"])
    assert check("127.0.0.1", 80, DestinationPolicy(), own=OWN, builtin=False).allowed
    assert not check("169.254.169.254", 80, deny_local, own=OWN, builtin=False).allowed


def test_deny_rules_match_network_and_ports():
    rules = policy(deny=["203.0.113.0/24:25,8000-8999", "[2001:db8::/32]:25"])
    assert not rules.decide(ipaddress.ip_address("203.0.113.7"), 25).allowed
    assert not rules.decide(ipaddress.ip_address("203.0.113.7"), 8000).allowed
    assert not rules.decide(ipaddress.ip_address("203.0.113.7"), 8999).allowed
    assert rules.decide(ipaddress.ip_address("203.0.113.7"), 9000).allowed
    assert rules.decide(ipaddress.ip_address("203.0.113.7"), 80).allowed
    assert rules.decide(ipaddress.ip_address("198.51.100.7"), 25).allowed
    assert not rules.decide(ipaddress.ip_address("2001:db8:2::2"), 25).allowed
    assert rules.decide(ipaddress.ip_address("2001:db8:2::2"), 80).allowed


def test_an_allow_list_is_a_whitelist():
    rules = policy(allow=["203.0.113.0/24:80,443"])
    assert rules.decide(ipaddress.ip_address("203.0.113.2"), 443).allowed
    refused = rules.decide(ipaddress.ip_address("203.0.113.2"), 8080)
    assert not refused.allowed
    assert refused.reason == "203.0.113.2:8080 is not in this port's allow_destinations"
    assert not rules.decide(ipaddress.ip_address("192.0.2.1"), 80).allowed


def test_deny_rules_come_before_allow_rules_and_the_first_match_decides():
    rules = policy(deny=["203.0.113.99", "203.0.113.0/24:22"], allow=["203.0.113.0/24", "*:443"])
    decision = rules.decide(ipaddress.ip_address("203.0.113.99"), 80)
    assert not decision.allowed and decision.rule == "203.0.113.99"
    assert "denied by deny_destinations '203.0.113.99'" in decision.reason
    decision = rules.decide(ipaddress.ip_address("203.0.113.5"), 22)
    assert decision.rule == "203.0.113.0/24:22"
    assert rules.decide(ipaddress.ip_address("203.0.113.5"), 80).rule == "203.0.113.0/24"
    assert rules.decide(ipaddress.ip_address("192.0.2.1"), 443).rule == "*:443"


def test_rules_match_ipv4_mapped_addresses_as_ipv4():
    rules = policy(deny=["203.0.113.0/24", "::ffff:192.0.2.0/120"])
    assert not rules.decide(ipaddress.ip_address("::ffff:203.0.113.9"), 80).allowed
    assert not rules.decide(ipaddress.ip_address("192.0.2.9"), 80).allowed


def test_no_rules_allow_everything():
    assert DestinationPolicy().empty
    assert DestinationPolicy().decide(ipaddress.ip_address("192.0.2.1"), 1).allowed


def test_normalize_unmaps_and_drops_zones():
    assert str(normalize("::ffff:198.51.100.2")) == "198.51.100.2"
    assert str(normalize("fe80::1%eth0")) == "fe80::1"
    assert str(normalize(ipaddress.ip_address("2001:db8::1"))) == "2001:db8::1"


# --- properties ---------------------------------------------------------------------------

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(1, 65535)


@st.composite
def rules(draw):
    """A rule's text and the (network or None, port ranges) it means."""
    if draw(st.booleans()):
        network = None
        text = "*"
    else:
        address = draw(st.one_of(ipv4, ipv6))
        prefix = draw(st.integers(0, address.max_prefixlen))
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
        text = str(network)
    ranges = draw(st.lists(st.tuples(ports, ports).map(sorted), max_size=4))
    if ranges:
        spec = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)
        bracket = network is not None and network.version == 6
        text = f"[{text}]:{spec}" if bracket else f"{text}:{spec}"
    return text, network, [tuple(r) for r in ranges] or [(1, 65535)]


def _means(network, ranges, address, port) -> bool:
    address = normalize(address)
    in_network = network is None or (address.version == network.version and address in network)
    return in_network and any(low <= port <= high for low, high in ranges)


@given(rule=rules(), address=st.one_of(ipv4, ipv6), port=ports)
def test_a_rule_matches_exactly_what_its_text_says(rule, address, port):
    text, network, ranges = rule
    if (
        network is not None
        and network.version == 6
        and network.subnet_of(ipaddress.ip_network("::ffff:0:0/96"))
    ):
        return  # IPv4-mapped networks are rewritten as IPv4: tested above
    parsed = C.parse_destination(text, allow=False)
    assert parsed.matches(normalize(address), port) == _means(network, ranges, address, port)


@given(address=st.one_of(ipv4, ipv6))
def test_an_ipv4_mapped_address_is_decided_like_its_ipv4_form(address):
    if address.version == 4:
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        assert builtin_refusal(mapped, OWN) == builtin_refusal(address, OWN)


@given(
    deny=st.lists(rules(), max_size=3),
    allow=st.lists(rules(), max_size=3),
    address=st.one_of(ipv4, ipv6),
    port=ports,
)
def test_the_decision_is_the_first_matching_rule_deny_before_allow(deny, allow, address, port):
    rules_ = policy(deny=[r[0] for r in deny], allow=[r[0] for r in allow])
    decision = rules_.decide(address, port)
    ordered = [(False, r) for r in rules_.deny] + [(True, r) for r in rules_.allow]
    first = next(((ok, r) for ok, r in ordered if r.matches(normalize(address), port)), None)
    if first is None:
        assert decision.allowed == (not rules_.allow)
        assert decision.rule is None
    else:
        assert decision.allowed == first[0]
        assert decision.rule == first[1].text


@given(address=st.one_of(ipv4, ipv6), port=ports)
def test_the_builtin_refusals_are_exactly_the_listed_networks(address, port):
    address = normalize(address)
    expected = (
        address.is_loopback
        or str(address) in OWN
        or (address.version == 4 and address in ipaddress.ip_network("0.0.0.0/8"))
        or (address.version == 6 and address.is_unspecified)
        or address.is_link_local
    )
    assert (builtin_refusal(address, OWN) is not None) == expected
