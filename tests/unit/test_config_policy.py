"""Configuration of the proxy policy: via, visible_hostname, destinations, auth."""

import bcrypt
import pytest

from tproxy_twist import config as C

FORWARD = """
[[port]]
listen = "[::]:3128"
mode = "forward"
"""
TPROXY = """
[[port]]
listen = "[::]:3129"
mode = "tproxy"
"""


def load(text: str) -> C.Config:
    return C.loads(text, "test.toml")


def error(text: str) -> str:
    with pytest.raises(C.ConfigError) as info:
        load(text)
    return str(info.value)


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    alice = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4))
    bob = b"$2y$" + bcrypt.hashpw(b"builder", bcrypt.gensalt(4))[4:]  # as htpasswd -B writes
    path.write_bytes(b"alice:" + alice + b"\n\n# comment\nbob:" + bob + b"\n")
    return path


def test_policy_defaults_via_on_no_rules_no_auth_host_name_in_via():
    config = load(FORWARD)
    port = config.ports[0]
    assert port.via is True
    assert port.destinations.empty
    assert port.auth is None
    assert config.visible_hostname is None


def test_via_can_be_turned_off_per_port_and_the_name_set_globally():
    config = load('visible_hostname = "proxy.example.net"\n' + FORWARD + "via = false\n" + TPROXY)
    assert config.visible_hostname == "proxy.example.net"
    assert [p.via for p in config.ports] == [False, True]


def test_destination_lists_are_read_in_order_on_every_mode():
    text = TPROXY + 'deny_destinations = ["10.0.0.0/8", "[2001:db8::/32]:25"]\n'
    text += 'allow_destinations = ["*:80,443,8000-8999"]\n'
    rules = load(text).ports[0].destinations
    assert [r.text for r in rules.deny] == ["10.0.0.0/8", "[2001:db8::/32]:25"]
    assert [(r.allow, r.network, r.ports) for r in rules.allow] == [
        (True, None, ((80, 80), (443, 443), (8000, 8999)))
    ]


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ('"10.0.0.0/33"', "is not an IP network"),
        ('"example.com"', "is not an IP network"),
        ('"10.0.0.0/8:"', "ports must look like 80,443,8000-8999"),
        ('"10.0.0.0/8:0"', "must be within 1-65535"),
        ('"10.0.0.0/8:90-80"', "must be within 1-65535"),
        ('"10.0.0.0/8:65536"', "must be within 1-65535"),
        ('"10.0.0.0/8:8²"', "ports must look like"),
        ('"[2001:db8::/32]443"', "[2001:db8::/32]:443"),
        ("80", "must be a string"),
    ],
)
def test_a_bad_destination_rule_names_the_file_key_and_entry(entry, fragment):
    message = error(FORWARD + f'deny_destinations = ["192.0.2.0/24", {entry}]\n')
    assert message.startswith("test.toml: port[0].deny_destinations[1]: ")
    assert fragment in message


@pytest.mark.parametrize("name", ["a b", "", "x,y", "proxy/1", "é"])
def test_visible_hostname_must_be_a_host_name(name):
    assert error(f'visible_hostname = "{name}"\n' + FORWARD).startswith(
        "test.toml: visible_hostname: "
    )


def test_auth_reads_bcrypt_entries_from_the_htpasswd_file(htpasswd):
    text = FORWARD + f'auth = {{ htpasswd = "{htpasswd}", realm = "Staff only" }}\n'
    auth = load(text).ports[0].auth
    assert auth.htpasswd == str(htpasswd)
    assert auth.realm == "Staff only"
    assert [user for user, _ in auth.users] == ["alice", "bob"]
    assert bcrypt.checkpw(b"builder", auth.users[1][1])
    assert (auth.credentials_ttl, auth.max_failures, auth.failure_window) == (60.0, 10, 60.0)


@pytest.mark.parametrize(
    "auth, fragment",
    [
        ('{ realm = "x" }', "port[0].auth.htpasswd: is required"),
        ('{ htpasswd = "htpasswd" }', "port[0].auth.htpasswd: 'htpasswd' must be an absolute"),
        ('{ htpasswd = "/nonexistent/htpasswd" }', "cannot read /nonexistent/htpasswd"),
        ('{ htpasswd = "HT", realm = "a\\"b" }', "port[0].auth.realm: must be 1 to 200"),
        ('{ htpasswd = "HT", max_failures = 0 }', "port[0].auth.max_failures: must be from 1"),
        ('{ htpasswd = "HT", colour = 1 }', "port[0].auth.colour: unknown key"),
    ],
)
def test_auth_mistakes_name_the_key(htpasswd, auth, fragment):
    assert fragment in error(FORWARD + f"auth = {auth.replace('HT', str(htpasswd))}\n")


def test_auth_only_on_forward_ports(htpasswd):
    message = error(TPROXY + f'auth = {{ htpasswd = "{htpasswd}" }}\n')
    assert "port[0].auth: only applies to forward ports" in message


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"alice:$apr1$abc$0123456789012345678901\n", "line 1: user 'alice' does not have"),
        (b"alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "does not have a bcrypt hash"),
        (b"just-a-name\n", "line 1: not user:hash"),
    ],
)
def test_an_unusable_htpasswd_file_refuses_the_config_with_its_line(tmp_path, content, fragment):
    path = tmp_path / "htpasswd"
    path.write_bytes(content)
    message = error(FORWARD + f'auth = {{ htpasswd = "{path}" }}\n')
    assert message.startswith("test.toml: port[0].auth.htpasswd: ")
    assert fragment in message


def test_a_user_listed_twice_is_refused(tmp_path):
    entry = b"alice:" + bcrypt.hashpw(b"x", bcrypt.gensalt(4)) + b"\n"
    path = tmp_path / "htpasswd"
    path.write_bytes(entry + entry)
    assert "line 2: user 'alice' is already on line 1" in error(
        FORWARD + f'auth = {{ htpasswd = "{path}" }}\n'
    )


def test_sample_config_forward_port_listens_on_ipv6_too():
    config = C.load("etc/tproxy.toml")
    forward = next(p for p in config.ports if p.mode == "forward")
    assert forward.listen.host == "::"


def test_via_is_refused_on_tls_ports():
    text = '[[port]]\nlisten = "[::]:3130"\nmode = "tproxy"\nprotocol = "tls"\nvia = false\n'
    message = error(text)
    assert message.startswith("test.toml: port[0].via: does not apply to TLS")


def test_tls_ports_take_destination_rules():
    text = (
        '[[port]]\nlisten = "[::]:3130"\nmode = "tproxy"\nprotocol = "tls"\n'
        'deny_destinations = ["10.0.0.0/8"]\nallow_destinations = ["*:443"]\n'
    )
    (port,) = C.loads(text, "test.toml").ports
    assert [r.text for r in port.destinations.deny] == ["10.0.0.0/8"]
    assert [r.text for r in port.destinations.allow] == ["*:443"]
