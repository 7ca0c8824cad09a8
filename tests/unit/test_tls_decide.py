"""TLS decision rules (first match wins) and their configuration."""

from __future__ import annotations

import ipaddress

import pytest

from tproxy_twist import config as C
from tproxy_twist.tls.decide import Decision, TLSPolicy, TLSRule, decide, name_matches

CLIENT = "198.51.100.2"
DEST = "203.0.113.2"


def net(text: str):
    return ipaddress.ip_network(text)


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        (".example.com", "example.com", True),
        (".example.com", "www.example.com", True),
        (".example.com", "a.b.example.com", True),
        (".example.com", "badexample.com", False),
        (".example.com", "example.com.evil", False),
    ],
)
def test_names_match_exactly_or_as_a_dot_suffix_like_squids_server_name(pattern, name, expected):
    assert name_matches(pattern, name) is expected


def test_the_first_matching_rule_decides():
    policy = TLSPolicy(
        rules=(
            TLSRule("splice", sni=("ok.blocked.example",)),
            TLSRule("deny", sni=(".blocked.example",)),
        ),
        default="splice",
    )
    assert decide(policy, "ok.blocked.example", CLIENT, DEST) == Decision("splice", "rule", 0)
    assert decide(policy, "x.blocked.example", CLIENT, DEST) == Decision("deny", "rule", 1)
    assert decide(policy, "other.example", CLIENT, DEST) == Decision("splice", "default")


def test_every_match_of_a_rule_must_hold():
    rule = TLSRule(
        "deny",
        sni=(".example",),
        clients=(net("198.51.100.0/24"),),
        destinations=(net("203.0.113.0/24"), net("2001:db8:2::/48")),
    )
    assert rule.matches("a.example", CLIENT, DEST)
    assert rule.matches("a.example", CLIENT, "2001:db8:2::2")
    assert not rule.matches("a.other", CLIENT, DEST)
    assert not rule.matches("a.example", "192.0.2.1", DEST)
    assert not rule.matches("a.example", CLIENT, "192.0.2.9")


def test_a_hello_without_sni_never_matches_an_sni_rule_and_gets_the_no_sni_action():
    policy = TLSPolicy(rules=(TLSRule("splice", sni=(".example",)),), default="splice",
                       no_sni="deny")  # fmt: skip
    assert decide(policy, None, CLIENT, DEST) == Decision("deny", "no_sni")


def test_a_rule_without_sni_match_applies_to_hellos_without_sni_too():
    policy = TLSPolicy(rules=(TLSRule("deny", clients=(net("198.51.100.0/24"),)),), no_sni="splice")
    assert decide(policy, None, CLIENT, DEST) == Decision("deny", "rule", 0)


# --- configuration -------------------------------------------------------------------

TLS_PORT = """
[[port]]
name = "tls"
listen = "[::]:3130"
mode = "tproxy"
protocol = "tls"
"""


def load(text: str) -> C.Config:
    return C.loads(text, "/etc/tproxy-twist/tproxy.toml")


def test_a_tls_port_diverts_443_and_splices_everything_by_default():
    port = load(TLS_PORT).ports[0]
    assert port.protocol == "tls"
    assert port.divert == (443,)
    assert port.tls == C.TLSPortConfig()
    assert port.tls.policy == TLSPolicy(rules=(), default="splice", no_sni="splice")
    assert port.tls.on_not_tls == "close"
    assert port.tls.client_hello_timeout == 5.0
    assert port.tls.block_quic is True


def test_http_ports_stay_http_without_tls_settings():
    port = load('[[port]]\nlisten = "3129"\nmode = "tproxy"\n').ports[0]
    assert port.protocol == "http" and port.tls is None and port.divert == (80,)


def test_tls_rules_are_read_in_order_with_names_lowered():
    config = load(
        TLS_PORT
        + """
on_not_tls = "tunnel"
client_hello_timeout = 2.5
block_quic = false
[port.tls]
default = "deny"
no_sni = "splice"
[[port.tls.rule]]
action = "splice"
sni = ["Allowed.Example.", ".cdn.example"]
[[port.tls.rule]]
action = "deny"
clients = ["198.51.100.0/24"]
destinations = ["2001:db8:2::/48"]
"""
    )
    tls = config.ports[0].tls
    assert tls.on_not_tls == "tunnel" and tls.client_hello_timeout == 2.5 and not tls.block_quic
    assert tls.policy == TLSPolicy(
        rules=(
            TLSRule("splice", sni=("allowed.example", ".cdn.example")),
            TLSRule("deny", clients=(net("198.51.100.0/24"),),
                    destinations=(net("2001:db8:2::/48"),)),
        ),
        default="deny",
        no_sni="splice",
    )  # fmt: skip


def test_no_sni_defaults_to_the_ports_default():
    config = load(TLS_PORT + '[port.tls]\ndefault = "deny"\n')
    assert config.ports[0].tls.policy.no_sni == "deny"


@pytest.mark.parametrize(
    "extra, key, reason",
    [
        ('protocol = "quic"', "port[0].protocol", "must be one of http, tls"),
        ('on_not_tls = "http"', "port[0].on_not_tls", "must be one of close, tunnel"),
        ("client_hello_timeout = 0", "port[0].client_hello_timeout", "must be at least"),
        ('[port.tls]\ndefault = "peek"', "port[0].tls.default", "must be one of splice, deny, b"),
        ("[[port.tls.rule]]\nsni = ['a.example']", "port[0].tls.rule[0].action", "is required"),
        (
            "[[port.tls.rule]]\naction = 'deny'\nsni = ['a b']",
            "port[0].tls.rule[0].sni[0]",
            "is not a server name",
        ),
        (
            "[[port.tls.rule]]\naction = 'deny'\nclients = ['nope']",
            "port[0].tls.rule[0].clients[0]",
            "is not an IP network",
        ),
        ("[[port.tls.rule]]\naction = 'deny'\nsnis = []", "port[0].tls.rule[0].snis", "unknown"),
    ],
)
def test_tls_config_mistakes_name_the_file_key_and_reason(extra, key, reason):
    text = TLS_PORT.replace('protocol = "tls"', extra) if "protocol" in extra else TLS_PORT + extra
    with pytest.raises(C.ConfigError) as e:
        load(text)
    message = str(e.value)
    assert message.startswith(f"/etc/tproxy-twist/tproxy.toml: {key}: "), message
    assert reason in message


def test_tls_keys_on_an_http_port_are_refused():
    with pytest.raises(C.ConfigError, match=r"port\[0\]\.on_not_tls: only applies to ports with"):
        load('[[port]]\nlisten = "3129"\nmode = "tproxy"\non_not_tls = "tunnel"\n')


def test_tls_on_a_forward_port_is_refused():
    with pytest.raises(C.ConfigError, match=r"port\[0\]\.protocol: .*tproxy or intercept"):
        load('[[port]]\nlisten = "3128"\nmode = "forward"\nprotocol = "tls"\n')


@pytest.mark.parametrize(
    "extra, bumps",
    [
        ("", False),
        ('[port.tls]\ndefault = "deny"\n[[port.tls.rule]]\naction = "splice"\n', False),
        ('[port.tls]\ndefault = "bump"\n', True),
        ('[port.tls]\nno_sni = "bump"\n', True),
        ('[[port.tls.rule]]\naction = "bump"\nsni = [".example.org"]\n', True),
    ],
)
def test_a_config_bumps_exactly_when_a_rule_or_default_of_a_tls_port_says_bump(extra, bumps):
    config = load(TLS_PORT + extra)
    assert config.bumps is bumps
    assert config.ports[0].tls.policy.bumps is bumps


def test_bump_is_an_action_a_rule_may_decide():
    policy = TLSPolicy(rules=(TLSRule("bump", sni=(".example.org",)),))
    assert decide(policy, "www.example.org", "198.51.100.2", "203.0.113.2").action == "bump"
    assert decide(policy, "example.net", "198.51.100.2", "203.0.113.2").action == "splice"
