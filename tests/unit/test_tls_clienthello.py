"""The sans-IO ClientHello reader: examples, a real OpenSSL hello, and properties (hypothesis)."""

from __future__ import annotations

import os
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tls_hello_reference import parse_client_hello_body as reference_parse

from tproxy_twist.testing import (
    alpn_extension,
    extension,
    hello_message,
    records,
    sni_extension,
    tls_vector,
    versions_extension,
)
from tproxy_twist.tls.clienthello import (
    ClientHello,
    ClientHelloReader,
    HelloError,
    alert,
    is_grease,
    parse_client_hello_body,
)

SCALE = int(os.environ.get("TPROXY_HYPOTHESIS_SCALE", "1"))
FAST = settings(
    max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def read_all(data: bytes, pieces: list[int] = ()) -> ClientHello | None:
    """Feed C{data} split at C{pieces}; the first non-None result."""
    reader = ClientHelloReader()
    bounds = [0, *sorted(set(p for p in pieces if 0 < p < len(data))), len(data)]
    result = None
    for start, end in zip(bounds, bounds[1:], strict=False):
        got = reader.feed(data[start:end])
        result = result or got
    return result


def openssl_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's ssl module (OpenSSL) for a connection."""
    context = ssl.create_default_context()
    context.check_hostname = server_hostname is not None
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- examples ---------------------------------------------------------------------------


def test_a_real_openssl_hello_gives_its_sni_alpn_and_versions():
    hello = read_all(openssl_hello("www.Example.org", ["h2", "http/1.1"]))
    assert hello.sni == "www.example.org"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.versions
    assert hello.tls_version == "TLSv1.3"
    assert not hello.ech


def test_a_real_openssl_hello_fed_one_byte_at_a_time_gives_the_same_hello():
    data = openssl_hello("example.org", ["http/1.1"])
    assert read_all(data, list(range(len(data)))) == read_all(data)


def test_a_hello_without_sni_has_none():
    hello = read_all(records(hello_message([alpn_extension([b"http/1.1"])])))
    assert hello.sni is None
    assert hello.alpn == ("http/1.1",)


def test_a_hello_without_extensions_is_a_tls_1_0_style_hello():
    hello = read_all(records(hello_message(None, legacy_version=0x0301)))
    assert hello == ClientHello(
        sni=None, alpn=(), versions=(), legacy_version=0x0301, ech=False, grease=False,
        size=hello.size,
    )  # fmt: skip
    assert hello.tls_version == "TLSv1"


def test_grease_in_suites_extensions_or_versions_is_noticed_and_dropped_from_versions():
    assert read_all(records(hello_message([], suites=[0x1A1A, 0x1301]))).grease
    assert read_all(records(hello_message([extension(0x2A2A, b"")]))).grease
    hello = read_all(records(hello_message([versions_extension([0x3A3A, 0x0304, 0x0303])])))
    assert hello.grease and hello.versions == (0x0304, 0x0303)
    assert not read_all(records(hello_message([sni_extension(b"a.example")]))).grease


def test_ech_extension_is_flagged():
    hello = read_all(records(hello_message([sni_extension(b"public.example"),
                                            extension(0xFE0D, b"\x00" * 40)])))  # fmt: skip
    assert hello.ech and hello.sni == "public.example"


def test_a_hello_larger_than_a_segment_across_three_records_is_reassembled():
    big_alpn = [b"http/1.1"] + [bytes([0x61 + i % 26]) * 200 for i in range(10)]
    message = hello_message([sni_extension(b"pq.example"), alpn_extension(big_alpn)])
    assert len(message) > 1500
    hello = read_all(records(message, [3, 900]), [1, 700, 1460])
    assert hello.sni == "pq.example" and len(hello.alpn) == 11


def test_bytes_after_the_hello_are_kept_for_replay():
    data = openssl_hello("example.org") + b"\x14\x03\x03\x00\x01\x01"
    reader = ClientHelloReader()
    assert reader.feed(data[:10]) is None
    assert reader.feed(data[10:]) is not None
    assert reader.feed(b"more") is not None
    assert reader.buffered == data + b"more"


@pytest.mark.parametrize(
    "first",
    [b"G", b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01", b"SSH-2.0", b"\x15\x03\x03\x00\x02\x02\x28"],
)
def test_anything_not_starting_with_a_handshake_record_is_not_tls(first):
    with pytest.raises(HelloError) as e:
        ClientHelloReader().feed(first)
    assert e.value.reason == "not_tls"


TWO_NAMES = tls_vector(2, b"\x00" + tls_vector(2, b"a.b") + b"\x00" + tls_vector(2, b"c.d"))
MALFORMED = {
    "application data inside": records(hello_message([])[:5]) + b"\x17\x03\x03\x00\x01\x00",
    "record version 2": b"\x16\x02\x00\x00\x04\x01\x00\x00\x00",
    "zero-length record": b"\x16\x03\x01\x00\x00",
    "record over 2^14": b"\x16\x03\x01\x40\x01",
    "server hello": records(b"\x02\x00\x00\x04abcd"),
    "bytes after the hello in its record": records(hello_message([]) + b"\x01"),
    "duplicate extension": records(hello_message([extension(5, b""), extension(5, b"")])),
    "two host names": records(hello_message([extension(0, TWO_NAMES)])),
    "sni with a space": records(hello_message([sni_extension(b"a b.example")])),
    "sni with a NUL": records(hello_message([sni_extension(b"evil.example\x00.good")])),
    "sni is an IP": records(hello_message([sni_extension(b"203.0.113.2")])),
    "empty sni": records(hello_message([sni_extension(b"")])),
    "empty ALPN name": records(hello_message([alpn_extension([b""])])),
    "odd cipher suites": records(hello_message([], suites=[])),
    "extension overruns": records(hello_message([b"\x00\x05\x00\x09abc"])),
    "session id of 33 bytes": records(hello_message([], session_id=b"x" * 33)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_hellos_are_refused_with_a_reason(name):
    with pytest.raises(HelloError) as e:
        read_all(MALFORMED[name])
    assert e.value.reason == "malformed"


def test_more_than_the_cap_without_a_complete_hello_is_too_large():
    reader = ClientHelloReader(max_size=1000)
    message = hello_message([alpn_extension([b"x" * 200] * 5)])
    assert len(message) > 1000
    with pytest.raises(HelloError) as e:
        reader.feed(records(message, [100, 200, 300, 400, 500, 600, 700, 800]))
    assert e.value.reason == "too_large"


def test_a_hello_announcing_more_than_the_cap_is_refused_at_once():
    header = b"\x16\x03\x01\x00\x04\x01\x01\x00\x00"  # a 64 KiB ClientHello
    with pytest.raises(HelloError) as e:
        ClientHelloReader(max_size=65536).feed(header)
    assert e.value.reason == "too_large"


def test_a_record_reaching_beyond_the_cap_is_refused_before_it_arrives():
    with pytest.raises(HelloError) as e:
        ClientHelloReader(max_size=1000).feed(b"\x16\x03\x01\x04\x00")
    assert e.value.reason == "too_large"


def test_an_incomplete_hello_needs_more_data():
    data = records(hello_message([sni_extension(b"a.example")]))
    reader = ClientHelloReader()
    assert reader.feed(data[:-1]) is None
    assert reader.feed(data[-1:]).sni == "a.example"


def test_alert_is_a_fatal_tls_alert_record():
    assert alert(49) == b"\x15\x03\x03\x00\x02\x02\x31"


def test_grease_values_are_the_rfc_8701_ones():
    assert [v for v in range(0x10000) if is_grease(v)] == [0x0A0A + 0x1010 * i for i in range(16)]


# --- properties ---------------------------------------------------------------------------

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
host_names = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not all(part.isdigit() for part in h.split(".")))
)
alpn_names = st.binary(min_size=1, max_size=20)


@st.composite
def valid_hellos(draw: st.DrawFn) -> tuple[bytes, dict]:
    """A valid hello (in records, split at random) and what the reader must say about it."""
    sni = draw(st.none() | host_names)
    alpn = draw(st.lists(alpn_names, max_size=5))
    versions = draw(st.lists(st.sampled_from([0x0304, 0x0303, 0x0302, 0x7A7A]), max_size=4))
    padding = draw(st.integers(0, 3000))
    extensions = []
    if sni is not None:
        extensions.append(sni_extension(sni.encode()))
    if alpn:
        extensions.append(alpn_extension(alpn))
    if versions:
        extensions.append(versions_extension(versions))
    extensions.append(extension(21, b"\x00" * padding))  # padding, as big hellos have
    extensions = draw(st.permutations(extensions))
    message = hello_message(list(extensions))
    cuts = draw(st.lists(st.integers(1, len(message) - 1), max_size=6))
    expect = {
        "sni": sni,
        "alpn": tuple(p.decode("ascii", "backslashreplace") for p in alpn),
        "versions": tuple(v for v in versions if v != 0x7A7A),
        "grease": 0x7A7A in versions,
    }
    return records(message, cuts), expect


@FAST
@given(valid_hellos(), st.data())
def test_any_split_of_a_valid_hello_reads_the_same_as_the_whole(case, data):
    raw, expect = case
    pieces = data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=8))
    whole = read_all(raw)
    assert read_all(raw, pieces) == whole
    assert {k: getattr(whole, k) for k in expect} == expect


def mutated(data: st.DataObject, raw: bytes) -> bytes:
    """C{raw} with one to six bytes flipped, deleted or inserted."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        if not raw:
            break
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[position]
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@FAST
@given(valid_hellos(), st.data())
def test_mutated_hellos_only_ever_raise_the_readers_own_error(case, data):
    raw = mutated(data, case[0])
    if not raw:
        return
    pieces = data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=4))
    try:
        hello = read_all(bytes(raw), pieces)
    except HelloError as e:
        assert e.reason in ("not_tls", "too_large", "malformed")
        return
    if hello is not None and hello.sni is not None:
        assert set(hello.sni) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_break_the_reader(raw):
    try:
        read_all(raw, [1, 5, 9])
    except HelloError as e:
        assert e.reason in ("not_tls", "too_large", "malformed")


# --- the parse against its slower predecessor --------------------------------------------


def parse_both(body: bytes):
    """Each parse's answer for one hello body: a ClientHello, or the error's reason."""
    answers = []
    for parse in (parse_client_hello_body, reference_parse):
        try:
            answers.append(parse(body, len(body) + 4))
        except HelloError as e:
            answers.append(e.reason)
    return answers


@st.composite
def hello_bodies(draw: st.DrawFn) -> bytes:
    """Hello bodies with every extension the parse looks into, valid or not in content."""
    sni = draw(st.none() | host_names | st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
    extensions = []
    if sni is not None:
        extensions.append(sni_extension(sni.encode("latin-1")))
    alpn = draw(st.lists(st.binary(max_size=6), max_size=4))
    if alpn or draw(st.booleans()):
        extensions.append(alpn_extension(alpn))
    versions = draw(st.lists(st.sampled_from([0x0304, 0x0303, 0x1A1A, 0x0A0A]), max_size=4))
    if versions or draw(st.booleans()):
        extensions.append(versions_extension(versions))
    if draw(st.booleans()):
        extensions.append(extension(0xFE0D, b"ech"))
    if draw(st.booleans()):
        extensions.append(extension(0x2A2A, b""))
    extensions = list(draw(st.permutations(extensions)))
    suites = draw(st.lists(st.sampled_from([0x1301, 0xC02F, 0x3A3A]), min_size=1, max_size=4))
    return hello_message(extensions, suites=suites)[4:]


def test_a_real_openssl_hello_parses_as_it_did_before():
    for hello in (openssl_hello("a.example", ["h2", "http/1.1"]), openssl_hello(None)):
        body = hello[9:]
        new, old = parse_both(body)
        assert isinstance(new, ClientHello) and new == old


@FAST
@given(hello_bodies(), st.data())
def test_the_parse_answers_as_its_predecessor_did_for_any_body_mutated_or_not(body, data):
    new, old = parse_both(body)
    assert new == old
    if data.draw(st.booleans()):
        new, old = parse_both(mutated(data, body))
        assert new == old
