"""Configuration: every mistake names the file, the key and what is allowed."""

import ipaddress

import pytest

from tproxy_twist import config as C

BASE = """
[[port]]
listen = "0.0.0.0:3128"
mode = "forward"
"""


def load(text: str) -> C.Config:
    return C.loads(text, "test.toml")


def error(text: str) -> str:
    with pytest.raises(C.ConfigError) as info:
        load(text)
    return str(info.value)


def test_sample_config_loads_with_forward_and_tproxy_ports():
    config = C.load("etc/tproxy.toml")
    assert [(p.name, p.mode, str(p.listen)) for p in config.ports] == [
        ("forward", "forward", "[::]:3128"),
        ("transparent", "tproxy", "[::]:3129"),
        ("tls", "tproxy", "[::]:3130"),
    ]
    assert config.workers == 2
    assert str(config.metrics_listen) == "127.0.0.1:9464"


def test_defaults_are_safe():
    config = load(BASE)
    port = config.ports[0]
    assert port.name == "3128"
    assert config.workers == 0
    assert port.spoof_client_ip is False
    assert port.connect_ports == (443,)
    assert not port.allows("198.51.100.7")  # a forward port is not an open relay
    assert port.allows("192.168.1.5") and port.allows("::1")
    assert config.timeouts.connect == 10.0
    assert str(config.metrics_listen) == "127.0.0.1:9464"


def test_tproxy_port_spoofs_and_diverts_port_80_by_default():
    port = load('[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n').ports[0]
    assert port.spoof_client_ip is True
    assert port.divert == (80,)
    assert port.allows("198.51.100.7") and port.allows("2001:db8::1")


def test_spoofing_can_be_turned_off_on_a_tproxy_port():
    text = '[[port]]\nlisten = "3129"\nmode = "tproxy"\nspoof_client_ip = false\n'
    assert load(text).ports[0].spoof_client_ip is False


def test_metrics_listener_can_be_turned_off():
    assert load('[metrics]\nlisten = ""\n' + BASE).metrics_listen is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:3129", ("::1", 3129)),
        ("3129", ("::", 3129)),
        ("[::ffff:198.51.100.1]:80", ("198.51.100.1", 80)),
    ],
)
def test_listen_addresses_parse(text, expected):
    address = C.parse_address(text)
    assert (address.host, address.port) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("workers = -1\n" + BASE, "workers: must be from 0 to 1024"),
        ('workers = "2"\n' + BASE, "workers: must be an integer"),
        ("workers = true\n" + BASE, "workers: must be an integer"),
        ("wokers = 2\n" + BASE, "wokers: unknown key"),
        ("", "port: at least one [[port]]"),
        ('[[port]]\nlisten = "0.0.0.0:3128"\n', "port[0].mode: is required"),
        ('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "nat"\n', "port[0].mode: must be one of"),
        ('[[port]]\nmode = "forward"\n', "port[0].listen: is required"),
        ('[[port]]\nlisten = "example.com:80"\nmode = "forward"\n', "is not an IP address"),
        ('[[port]]\nlisten = "0.0.0.0:0"\nmode = "forward"\n', "port '0' must be a number"),
        ('[[port]]\nlisten = "0.0.0.0:99999"\nmode = "forward"\n', "must be a number from 1"),
        ('[[port]]\nlisten = "::1:80"\nmode = "forward"\n', "[ipv6]:port"),
        (BASE + "colour = 1\n", "port[0].colour: unknown key"),
        (BASE + 'allow = ["10.0.0.0/33"]\n', "allow[0]: '10.0.0.0/33' is not"),
        (BASE + "allow = [1]\n", "port[0].allow[0]: must be a network"),
        (BASE + "connect_ports = [0]\n", "port[0].connect_ports[0]: must be a port number"),
        (BASE + "divert = [80]\n", "port[0].divert: only applies to tproxy ports"),
        (BASE + "spoof_client_ip = true\n", "port[0].spoof_client_ip: is only possible"),
        (BASE + 'name = "a b"\n', "port[0].name: must be non-empty"),
        (BASE + BASE.replace("3128", "3129") + 'name = "3128"\n', "name: '3128' is already"),
        (BASE + BASE, "port[1].listen: 0.0.0.0:3128 duplicates port[0]"),
        ("[timeouts]\nconnect = 0\n" + BASE, "timeouts.connect: must be at least"),
        ("[timeouts]\nconect = 1\n" + BASE, "timeouts.conect: unknown key"),
        ('[timeouts]\nconnect = "1"\n' + BASE, "timeouts.connect: must be a number of seconds"),
        ("[limits]\nmax_header_size = 10\n" + BASE, "limits.max_header_size: must be from"),
        ("port = 3\n", "port: must be a list"),
        ("port = [1]\n", "port[0]: must be a table"),
        ("[metrics]\nlisten = 9464\n" + BASE, "metrics.listen: must be a string"),
        ("x = [\n", "not valid TOML"),
        ('user = "no-such-user-here"\n' + BASE, "user: no such user 'no-such-user-here'"),
        ('group = "root"\n' + BASE, "group: needs `user`"),
        ('user = "root"\ngroup = "no-such-group"\n' + BASE, "group: no such group"),
        ("drain_timeout = -1\n" + BASE, "drain_timeout: must be at least 0"),
        ('[access_log]\nformat = "xml"\n' + BASE, "access_log.format: must be one of squid"),
        ('[access_log]\npth = "x"\n' + BASE, "access_log.pth: unknown key"),
        ("[access_log]\nflush_interval = -1\n" + BASE, "flush_interval: must be at least 0"),
        ("[access_log]\nflush_interval = 11\n" + BASE, "flush_interval: must be at most 10"),
        ('[access_log]\nflush_interval = "1s"\n' + BASE, "flush_interval: must be a number"),
        ("[limits]\nmax_connections = 0\n" + BASE, "limits.max_connections: must be from 1"),
        ("[limits]\nmax_body_size = -1\n" + BASE, "limits.max_body_size: must be from 0"),
        (BASE + "host_verify_strict = true\n", "port[0].host_verify_strict: only applies"),
        (BASE + 'x_forwarded_for = "yes"\n', "port[0].x_forwarded_for: must be one of off"),
        (BASE + 'stream_relay = "zerocopy"\n', "port[0].stream_relay: must be one of copy, splice"),
        (BASE + "stream_relay = true\n", "port[0].stream_relay: must be"),
    ],
)
def test_mistakes_name_the_key_and_the_rule(text, fragment):
    message = error(text)
    assert message.startswith("test.toml: ")
    assert fragment in message


@pytest.mark.parametrize(
    "other",
    ['"127.0.0.1:3129"', '"0.0.0.0:3129"', '"[::1]:3129"', '"3129"'],
)
def test_tproxy_port_may_not_share_its_address_with_another_mode(other):
    text = (
        f'[[port]]\nlisten = "[::]:3129"\nmode = "tproxy"\n'
        f'[[port]]\nlisten = {other}\nmode = "forward"\n'
    )
    assert "a tproxy port may not share its address with another mode" in error(text)


def test_different_ports_and_disjoint_addresses_do_not_clash():
    text = (
        '[[port]]\nlisten = "127.0.0.1:3129"\nmode = "forward"\n'
        '[[port]]\nlisten = "127.0.0.2:3129"\nmode = "forward"\nname = "b"\n'
        '[[port]]\nlisten = "0.0.0.0:3130"\nmode = "tproxy"\n'
    )
    assert len(load(text).ports) == 3


def test_ipv4_and_ipv6_wildcards_overlap_because_v6_sockets_serve_ipv4():
    assert C.parse_address("[::]:1").overlaps(C.parse_address("0.0.0.0:1"))
    assert not C.parse_address("[::1]:1").overlaps(C.parse_address("0.0.0.0:1"))
    assert not C.parse_address("[::]:1").overlaps(C.parse_address("0.0.0.0:2"))


def test_allow_accepts_networks_in_both_families():
    port = load(BASE + 'allow = ["198.51.100.0/24", "2001:db8::/32"]\n').ports[0]
    assert port.allow == (
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert port.allows("2001:db8:1::2") and not port.allows("203.0.113.1")


def test_missing_file_is_a_config_error():
    with pytest.raises(C.ConfigError, match="nope.toml: file not found"):
        C.load("nope.toml")


def test_byte_streams_are_copied_unless_the_port_asks_for_splice():
    assert load(BASE).ports[0].stream_relay == "copy"
    assert load(BASE + 'stream_relay = "splice"\n').ports[0].stream_relay == "splice"


def test_workers_flag_overrides_config():
    assert C.with_workers(load(BASE), 3).workers == 3


def test_identity_drain_and_access_log_keys():
    config = load(
        'user = "root"\ngroup = "root"\ndrain_timeout = 5\n'
        '[access_log]\npath = "/tmp/access.log"\nformat = "json"\n' + BASE
    )
    assert (config.user, config.group, config.drain_timeout) == ("root", "root", 5.0)
    assert (config.access_log.path, config.access_log.format) == ("/tmp/access.log", "json")
    assert load(BASE).access_log.path is None
    assert load(BASE).access_log.flush_interval == 0.0
    gathered = load('[access_log]\npath = "/tmp/a.log"\nflush_interval = 0.25\n' + BASE)
    assert gathered.access_log.flush_interval == 0.25


def test_a_port_allowing_every_network_allows_everyone_also_after_evolve():
    import ipaddress

    import attrs

    from tproxy_twist import config as C

    port = C.loads('[[port]]\nlisten = "0.0.0.0:3128"\nmode = "forward"\n').ports[0]
    assert not port.allows_everyone
    assert not port.allows("203.0.113.9")
    everyone = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    opened = attrs.evolve(port, allow=everyone)
    assert opened.allows_everyone and opened.allows("203.0.113.9")
    assert opened == attrs.evolve(port, allow=everyone)  # the cached flag is not part of eq
