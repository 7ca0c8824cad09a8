import pytest

from tproxy_twist.http.framing import ProtocolError
from tproxy_twist.http.target import parse_authority, split_absolute


@pytest.mark.parametrize(
    "authority, default, expected",
    [
        (b"example.com", 80, ("example.com", 80)),
        (b"Example.COM:8080", 80, ("example.com", 8080)),
        (b"203.0.113.2:443", None, ("203.0.113.2", 443)),
        (b"[2001:db8::2]:443", None, ("2001:db8::2", 443)),
        (b"[2001:db8::2]", 80, ("2001:db8::2", 80)),
    ],
)
def test_authorities_parse(authority, default, expected):
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    [b"", b"user@host", b"host:0", b"host:99999", b"host:x", b"[::1", b"[nope]:1", b"a b", b"h/x"],
)
def test_bad_authorities_are_400(authority):
    with pytest.raises(ProtocolError) as info:
        parse_authority(authority, 80)
    assert info.value.status == 400


def test_connect_needs_a_port():
    with pytest.raises(ProtocolError, match="host:port"):
        parse_authority(b"example.com", None)


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"http://a.example/x?y", (b"http", b"a.example", b"/x?y")),
        (b"HTTP://a.example", (b"http", b"a.example", b"/")),
        (b"http://a.example?q", (b"http", b"a.example", b"/?q")),
        (b"http://[2001:db8::1]:8443/", (b"http", b"[2001:db8::1]:8443", b"/")),
        (b"http://a.example:/", (b"http", b"a.example:", b"/")),
    ],
)
def test_absolute_form_splits_into_scheme_authority_and_origin_form(target, expected):
    assert split_absolute(target) == expected


def test_any_scheme_splits_when_the_caller_accepts_any():
    assert split_absolute(b"https://[2001:db8::1]:8443/", None) == (
        b"https",
        b"[2001:db8::1]:8443",
        b"/",
    )


def test_target_without_scheme_is_400():
    with pytest.raises(ProtocolError):
        split_absolute(b"a.example/x")


def test_https_url_on_a_plain_http_port_is_400_naming_connect():
    with pytest.raises(ProtocolError) as info:
        split_absolute(b"https://a.example/")
    assert info.value.status == 400
    assert "https://" in info.value.reason and "CONNECT" in info.value.reason


@pytest.mark.parametrize("target", [b"ftp://a.example/", b"ws://a.example/", b"x-y+z://a/"])
def test_other_schemes_are_400_naming_the_scheme(target):
    with pytest.raises(ProtocolError) as info:
        split_absolute(target)
    assert info.value.status == 400
    assert target.split(b":")[0].decode().lower() + "://" in info.value.reason


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"http://user@a.example/", "userinfo"),
        (b"http://user:pw@a.example/", "userinfo"),
        (b"http://@a.example/", "userinfo"),
        (b"http:///path", "empty authority"),
        (b"http://:80/", "empty host"),
        (b"http://a.example:0/", "port"),
        (b"http://a.example:65536/", "port"),
        (b"http://a.example:99999999999999999999/", "port"),
        (b"http://a.example:-1/", "port"),
        (b"http://a.example:8o/", "port"),
        (b"http://[2001:db8::1/", "IPv6"),
        (b"http://[2001:db8::1:80/", "IPv6"),
        (b"http://[nothex]/", "IPv6"),
        (b"http://[203.0.113.2]/", "IPv6"),
        (b"http://[fe80::1%25eth0]/", "zone"),
        (b"http://[2001:db8::1]x/", "authority"),
        (b'http://a"b/', "host"),
        (b"http://a<b>/", "host"),
        (b"http://a.example#frag", "host"),
        (b"http://a%2/", "host"),
        (b"http://a%zzb/", "host"),
        (b"http://\xc3\xa9.example/", "non-ASCII"),
    ],
)
def test_invalid_absolute_form_authorities_are_400_with_a_reason(target, reason):
    with pytest.raises(ProtocolError) as info:
        split_absolute(target)
    assert info.value.status == 400
    assert reason in info.value.reason


@pytest.mark.parametrize("port", [b"1", b"80", b"65535", b"08080"])
def test_ports_1_to_65535_are_accepted(port):
    assert split_absolute(b"http://a.example:" + port + b"/x")[1] == b"a.example:" + port
    assert parse_authority(b"a.example:" + port, None)[1] == int(port)
