"""Pure parts of the dataplane: inner packets, ICMP, MSS, registry, queues, config;
and the kernel-drop reader, against a real socket on 127.0.0.1."""

import ipaddress
import os
import socket
import struct
import threading

import pytest

from dataplane import inner
from dataplane.metrics import BoundedQueue, KernelDrops, KernelSendErrors
from dataplane.privileges import drop_privileges
from dataplane.registry import Registry, SessionRecord, packed_address
from dataplane.routing import TO_TUN, Action, Router
from netlab.packets import ipv4_tcp_syn, ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.ciphercache import CipherCache
from push_protocol.drops import DropReason, UsageError
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd, SessionState
from push_protocol.policy import ALLOW_ALL
from push_protocol.session import TunnelSession
from pushgate_io import gateway_config as config


def _tunnel(session_id: int) -> TunnelSession:
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
    return TunnelSession(session_id, CipherSuite.AES_256_GCM, Role.SERVER, keys)


def test_addresses_of_ipv4_and_ipv6():
    packet = ipv4_udp("198.19.0.2", "198.18.2.2", 1, 2, b"x")
    assert inner.addresses(packet) == (packed_address("198.19.0.2"), packed_address("198.18.2.2"))
    v6 = bytes([0x60]) + bytes(7) + packed_address("2001:db8::1") + packed_address("2001:db8::2")
    assert inner.addresses(v6)[1] == packed_address("2001:db8::2")


@pytest.mark.parametrize("packet", [b"", b"\x45" * 19, b"\x60" * 39, b"\x50" * 40, b"\x41" * 40])
def test_malformed_inner_packets(packet):
    with pytest.raises(inner.InnerMalformed) as caught:
        inner.addresses(packet)
    assert caught.value.reason is DropReason.INNER_MALFORMED


def test_ipv4_too_big_reply_is_valid_icmp():
    packet = ipv4_udp("198.19.0.2", "198.18.2.2", 1000, 2000, bytes(1500))
    reply = inner.too_big_reply(packet, 1420, packed_address("198.19.0.1"))
    assert inner.checksum(reply[:20]) == 0  # IP header checksum verifies
    assert inner.checksum(reply[20:]) == 0  # ICMP checksum verifies
    assert reply[9] == inner.PROTO_ICMP and reply[20:22] == b"\x03\x04"
    assert struct.unpack_from("!H", reply, 26)[0] == 1420
    assert reply[16:20] == packed_address("198.19.0.2")  # back to the sender
    assert reply[28:48] == packet[:20]  # quotes the offending header


def test_no_too_big_reply_without_df():
    packet = ipv4_udp("198.19.0.2", "198.18.2.2", 1, 2, bytes(1500), dont_fragment=False)
    assert inner.too_big_reply(packet, 1420, packed_address("198.19.0.1")) is None


def test_mss_clamp_lowers_and_fixes_the_checksum():
    syn = ipv4_tcp_syn("198.19.0.2", "198.18.2.2", 40000, 80, mss=1460)
    clamped = inner.clamp_mss(syn, 1380)
    assert struct.unpack_from("!H", clamped, 20 + 22)[0] == 1380
    pseudo = clamped[12:20] + struct.pack("!xBH", 6, len(clamped) - 20)
    assert inner.checksum(pseudo + clamped[20:]) == 0
    assert inner.clamp_mss(clamped, 1400) is clamped  # already small enough
    udp = ipv4_udp("198.19.0.2", "198.18.2.2", 1, 2, b"x")
    assert inner.clamp_mss(udp, 100) is udp


def test_registry_indexes_by_id_and_address_and_removes_cleanly():
    registry = Registry()
    a = SessionRecord(_tunnel(1), (packed_address("198.19.0.2"),), 0.0)
    b = SessionRecord(_tunnel(2), (packed_address("198.19.0.3"),), 0.0)
    registry.add(a)
    registry.add(b)
    assert registry.by_address[packed_address("198.19.0.3")] is b
    with pytest.raises(UsageError, match="already installed"):
        registry.add(SessionRecord(_tunnel(1), (), 0.0))
    assert registry.remove(1, SessionEnd.CLOSED) is a
    assert a.tunnel.state is SessionState.REMOVED
    assert packed_address("198.19.0.2") not in registry.by_address
    assert registry.remove(1, SessionEnd.CLOSED) is None
    assert registry.count_by_state()[SessionState.ACTIVE] == 1


def test_bounded_queue_counts_overflows_and_high_water():
    queue = BoundedQueue("q", 2)
    assert queue.put(1) and queue.put(2)
    assert not queue.put(3)
    assert (len(queue), queue.high_water, queue.overflows) == (2, 2, 1)
    queue.pop()
    assert queue.peek() == 2


GOOD = """
[gateway]
tunnel_network = "198.19.0.0/24"
gateway_address = "198.19.0.1"
control_socket = "run/control.sock"
[dataplane]
listen = "198.18.0.1:51820"
"""


def test_config_loads_with_defaults(tmp_path):
    path = tmp_path / "pushgate.toml"
    path.write_text(GOOD)
    cfg = config.load(str(path))
    assert cfg.gateway.gateway_address == ipaddress.ip_address("198.19.0.1")
    assert cfg.dataplane.listen == ("198.18.0.1", 51820)
    assert cfg.gateway.control_socket == str(tmp_path / "run/control.sock")
    assert cfg.gateway.mtu == 1420 and cfg.dataplane.tun_name == "pg0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('"198.19.0.1"', '"198.18.0.1"'), "not in 198.19.0.0/24"),
        (GOOD.replace('tunnel_network = "198.19.0.0/24"', ""), "tunnel_network is required"),
        (GOOD.replace('"198.18.0.1:51820"', '"nowhere"'), "listen: expected HOST:PORT"),
        (GOOD + 'tun_name = "a-name-that-is-too-long"', "tun_name"),
        (GOOD.replace("[dataplane]", 'mtu = "big"\n[dataplane]'), "mtu: expected a number"),
        ("[gateway", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "pushgate.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(str(path))


def _router():
    registry = Registry()
    # both may reach everything: the access policy's own cases are in test_policy.py
    alice = SessionRecord(_tunnel(1), (packed_address("198.19.0.2"),), 0.0, policy=ALLOW_ALL)
    bob = SessionRecord(_tunnel(2), (packed_address("198.19.0.3"),), 0.0, policy=ALLOW_ALL)
    registry.add(alice)
    registry.add(bob)
    router = Router(
        registry, ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_address("198.19.0.1"), 1420
    )
    return router, alice, bob


def test_routing_from_a_session():
    router, alice, bob = _router()

    def decide(src, dst, size=10):
        return router.from_session(alice, ipv4_udp(src, dst, 1, 2, bytes(size)))

    # out to the network: the one TUN decision (the receive loop tells it by identity);
    # the gateway itself only for what it offers (by default ping: tests/test_destinations.py)
    assert decide("198.19.0.2", "198.18.2.2") is TO_TUN
    assert decide("198.19.0.2", "198.19.0.1").reason is DropReason.FORBIDDEN_DESTINATION
    assert TO_TUN.action is Action.TUN
    hub = decide("198.19.0.2", "198.19.0.3")
    assert hub.action is Action.SESSION and hub.target is bob
    assert decide("198.19.0.3", "198.18.2.2").reason is DropReason.SPOOFED_SOURCE
    assert decide("198.19.0.2", "198.19.0.99").reason is DropReason.NO_ROUTE
    assert decide("198.19.0.2", "198.18.2.2", size=1500).action is Action.TOO_BIG
    assert router.from_session(alice, b"\x45").reason is DropReason.INNER_MALFORMED


def test_routing_from_the_tun():
    router, alice, _ = _router()
    to_alice = router.from_tun(ipv4_udp("198.18.2.2", "198.19.0.2", 1, 2, b"x"))
    assert to_alice.action is Action.SESSION and to_alice.target is alice
    assert router.from_tun(ipv4_udp("198.18.2.2", "198.19.0.77", 1, 2, b"x")).reason is (
        DropReason.NO_ROUTE
    )
    assert router.from_tun(b"").reason is DropReason.INNER_MALFORMED


def test_kernel_drops_read_the_sockets_own_receive_buffer_overflows():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receiver.bind(("127.0.0.1", 0))
    bystander = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # its drops are not ours
    bystander.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, bystander, sender:
        kernel = KernelDrops(receiver, "pg-no-such-tun")
        assert kernel() == {"udp_receive_buffer": 0, "tun_queue": 0}  # no TUN: nothing
        for _ in range(200):  # nobody reads: the 4 KiB buffer overflows after a few
            sender.sendto(bytes(1000), receiver.getsockname())
        received = 0
        receiver.setblocking(False)
        while True:
            try:
                receiver.recv(2048)
                received += 1
            except BlockingIOError:
                break
        assert kernel()["udp_receive_buffer"] == 200 - received > 0
        assert KernelDrops(bystander, "pg-no-such-tun")()["udp_receive_buffer"] == 0


def test_kernel_send_errors_add_the_ipv4_and_ipv6_counts_and_survive_missing_files(tmp_path):
    net = tmp_path / "net"
    net.mkdir()
    (net / "snmp").write_text(
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: 10 0 0 20 3 7\n"
        "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "UdpLite: 0 0 0 0 0 100\n"
    )
    kernel = KernelSendErrors(str(tmp_path))
    assert kernel() == 7  # no snmp6 (IPv6 off): the IPv4 count alone
    (net / "snmp6").write_text(
        "Udp6OutDatagrams                \t9\nUdp6SndbufErrors                \t5\n"
    )
    assert kernel() == 12
    assert KernelSendErrors(str(tmp_path / "elsewhere"))() == 0


def test_misuse_is_a_usage_error():
    """Programming errors are one family (push_protocol/drops.py)."""
    with pytest.raises(UsageError, match="at least one keypair"):
        CipherCache(0)
    started, release = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: (started.set(), release.wait()))
    other.start()
    started.wait()
    try:  # refused before it changes anything
        with pytest.raises(UsageError, match="before any other thread"):
            drop_privileges(None)
    finally:
        release.set()
        other.join()
