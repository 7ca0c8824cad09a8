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
        (b"https://[2001:db8::1]:8443/", (b"https", b"[2001:db8::1]:8443", b"/")),
    ],
)
def test_absolute_form_splits_into_scheme_authority_and_origin_form(target, expected):
    assert split_absolute(target) == expected


def test_target_without_scheme_is_400():
    with pytest.raises(ProtocolError):
        split_absolute(b"a.example/x")
