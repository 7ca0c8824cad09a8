"""Socket helpers that can be checked without privileges or namespaces."""

import socket

import pytest
from twisted.internet.task import Clock

from tproxy_twist import sockets
from tproxy_twist.config import ListenAddress


def test_ipv4_mapped_addresses_are_unmapped_and_others_kept():
    assert sockets.unmap("::ffff:198.51.100.2") == "198.51.100.2"
    assert sockets.unmap("2001:db8::1") == "2001:db8::1"
    assert sockets.unmap("198.51.100.2") == "198.51.100.2"


def test_host_addresses_include_loopback():
    assert "127.0.0.1" in sockets.host_addresses()


def test_local_addresses_refresh_after_their_ttl():
    clock = Clock()
    current = {"198.51.100.1"}
    calls = []

    def source():
        calls.append(1)
        return frozenset(current)

    local = sockets.LocalAddresses(clock, ttl=5, source=source)
    assert "198.51.100.1" in local
    current.add("203.0.113.1")
    assert "203.0.113.1" not in local  # cached
    clock.advance(5)
    assert "203.0.113.1" in local
    assert len(calls) == 2


def test_local_addresses_keep_the_last_known_set_when_a_refresh_fails():
    clock = Clock()
    answers = [frozenset({"198.51.100.1"}), OSError(24, "Too many open files")]

    def source():
        answer = answers.pop(0) if answers else frozenset({"203.0.113.1"})
        if isinstance(answer, OSError):
            raise answer
        return answer

    local = sockets.LocalAddresses(clock, ttl=5, source=source)
    assert "198.51.100.1" in local
    clock.advance(5)
    assert "198.51.100.1" in local  # the refresh failed (EMFILE): no exception, old set
    assert "203.0.113.1" in local  # and the next look retries


@pytest.mark.parametrize("host", ["127.0.0.5", "::1", "0.0.0.0", "::"])
def test_loopback_and_unspecified_are_always_local(host):
    local = sockets.LocalAddresses(Clock(), source=frozenset)
    assert host in local


def test_listening_socket_has_reuseport_and_serves_both_families():
    sock = sockets.listening_socket(ListenAddress("::", 0), transparent=False)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert not sock.getblocking()
    finally:
        sock.close()


def test_two_listeners_can_share_a_port_through_reuseport():
    first = sockets.listening_socket(ListenAddress("127.0.0.1", 0), transparent=False)
    port = first.getsockname()[1]
    second = sockets.listening_socket(ListenAddress("127.0.0.1", port), transparent=False)
    first.close()
    second.close()


def test_nat_original_destination_of_a_connection_that_was_not_redirected_fails():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        with pytest.raises(OSError):
            sockets.nat_original_destination(accepted)
    finally:
        for s in (client, accepted, server):
            s.close()
