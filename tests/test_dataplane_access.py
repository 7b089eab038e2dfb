"""The access policy in the dataplane: the router's decisions (push_protocol/policy.py
enforced in dataplane/routing.py), and the feed applying policies to sessions
(dataplane/sync.py): at install, on a policy change at once, shared by digest."""

import gc
import ipaddress
import os
import struct

import pytest

from dataplane.destinations import DestinationPolicy
from dataplane.metrics import Counters
from dataplane.registry import Registry, SessionRecord, packed_address
from dataplane.routing import TO_TUN, Action, Router, route_key
from dataplane.sync import SessionSync
from netlab.feed import access_policy, session
from netlab.packets import ipv4, ipv4_tcp_syn, ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.drops import DropReason
from push_protocol.keys import KeyMaterial, Role
from push_protocol.policy import ALLOW_ALL, NO_POLICY, CompiledPolicy, Rule
from push_protocol.session import TunnelSession
from pushgate_api import auth_pb2, control_pb2
from pushgate_io.gateway_config import OfferedService

GATEWAY = ipaddress.ip_address("198.19.0.1")
ALICE, BOB = "198.19.0.2", "198.19.0.3"
LAN1, LAN2 = "198.18.2.10", "198.18.2.11"
DENIED = DropReason.POLICY_DENIED

ENG = CompiledPolicy(
    [
        Rule.make(f"{LAN1}/32"),
        Rule.make("198.18.3.0/24", 6, [(22, 22)]),
        Rule.make(f"{BOB}/32", 6, [(22, 22)]),  # alice may ssh to bob
    ],
    "eng",
)


def record(session_id: int, address: str, policy) -> SessionRecord:
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
    tunnel = TunnelSession(session_id, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    return SessionRecord(tunnel, (packed_address(address),), 0.0, policy=policy)


def tcp(src, dst, sport, dport, flags=0x10):
    return ipv4(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1, 0, 0))


def icmp(src, dst, icmp_type):
    return ipv4(src, dst, 1, struct.pack("!BBHI", icmp_type, 0, 0, 0))


def make_world():
    registry = Registry()
    alice, bob = record(1, ALICE, ENG), record(2, BOB, NO_POLICY)
    registry.add(alice)
    registry.add(bob)
    destinations = DestinationPolicy(
        GATEWAY,
        offered=(
            OfferedService("ping", GATEWAY, None),
            OfferedService("udp", ipaddress.ip_address("198.18.2.53"), 53),
        ),
    )
    router = Router(registry, ipaddress.ip_network("198.19.0.0/24"), GATEWAY, 1420, destinations)
    return router, alice, bob


world = pytest.fixture(make_world)


def test_a_packet_to_the_network_passes_only_where_the_policy_allows(world):
    router, alice, bob = world
    assert router.from_session(alice, ipv4_udp(ALICE, LAN1, 1, 2, b"x")) is TO_TUN
    assert router.from_session(alice, ipv4_tcp_syn(ALICE, "198.18.3.4", 1, 22, 1400)) is TO_TUN
    for packet in (
        ipv4_udp(ALICE, LAN2, 1, 2, b"x"),
        ipv4_tcp_syn(ALICE, "198.18.3.4", 1, 23, 1400),
        ipv4_udp(ALICE, "198.18.3.4", 1, 22, b"x"),
    ):
        assert router.from_session(alice, packet).reason is DENIED
    # a session without a policy reaches nothing
    assert router.from_session(bob, ipv4_udp(BOB, LAN1, 1, 2, b"x")).reason is DENIED


def test_what_the_gateway_offers_is_reachable_without_a_rule_and_the_rest_stays_forbidden(world):
    router, _, bob = world
    assert router.from_session(bob, icmp(BOB, str(GATEWAY), 8)) is TO_TUN  # offered: ping
    assert router.from_session(bob, ipv4_udp(BOB, "198.18.2.53", 1, 53, b"q")) is TO_TUN
    assert router.from_session(bob, ipv4_udp(BOB, "198.18.2.53", 1, 54, b"q")).reason is DENIED
    # the gateway's own address: forbidden before any policy, for everyone
    everything = record(3, "198.19.0.4", ALLOW_ALL)
    router.registry.add(everything)
    packet = ipv4_udp("198.19.0.4", str(GATEWAY), 1, 9102, b"x")
    assert router.from_session(everything, packet).reason is DropReason.FORBIDDEN_DESTINATION
    # spoofing is still spoofing, whatever the policy
    spoofed = ipv4_udp("198.19.0.9", LAN1, 1, 2, b"x")
    assert router.from_session(everything, spoofed).reason is DropReason.SPOOFED_SOURCE


def test_client_to_client_needs_a_rule_or_is_a_reply_to_an_allowed_flow(world):
    router, alice, bob = world
    # alice -> bob:22 is allowed by alice's policy
    decision = router.from_session(alice, tcp(ALICE, BOB, 40000, 22, flags=0x02))
    assert decision.action is Action.SESSION and decision.target is bob
    assert router.from_session(alice, tcp(ALICE, BOB, 40000, 23, flags=0x02)).reason is DENIED
    assert router.from_session(alice, icmp(ALICE, BOB, 8)).reason is DENIED
    # bob (no policy) answers from port 22: a reply to what alice may send him
    decision = router.from_session(bob, tcp(BOB, ALICE, 22, 40000, flags=0x12))
    assert decision.action is Action.SESSION and decision.target is alice
    # ... but opening a connection from port 22, or anything from another port, is not
    assert router.from_session(bob, tcp(BOB, ALICE, 22, 40000, flags=0x02)).reason is DENIED
    assert router.from_session(bob, tcp(BOB, ALICE, 23, 40000)).reason is DENIED
    assert router.from_session(bob, icmp(BOB, ALICE, 0)).reason is DENIED  # no ICMP allowed


def test_a_policy_change_takes_effect_on_the_next_packet(world):
    router, alice, _ = world
    packet = ipv4_udp(ALICE, LAN2, 1, 2, b"x")
    assert router.from_session(alice, packet).reason is DENIED
    alice.policy = CompiledPolicy([Rule.make(f"{LAN2}/32")], "lan2")
    assert router.from_session(alice, packet) is TO_TUN
    assert router.from_session(alice, ipv4_udp(ALICE, LAN1, 1, 2, b"x")).reason is DENIED


# -- from the feed ------------------------------------------------------------------


def keys(epoch: int = 0) -> auth_pb2.SessionKeys:
    return auth_pb2.SessionKeys(
        key_epoch=epoch,
        client_to_server_key=os.urandom(32),
        server_to_client_key=os.urandom(32),
        created_at_unix_ms=0,
    )


def syncing() -> tuple[SessionSync, Registry, Counters]:
    registry, counters = Registry(), Counters()
    sync = SessionSync(registry, counters, "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=64))
    return sync, registry, counters


def installed(revision: int, feed_session) -> control_pb2.SessionEvent:
    return control_pb2.SessionEvent(revision=revision, installed=feed_session)


def lan_allowed(registry: Registry, session_id: int, lan: str) -> bool:
    return registry.by_id[session_id].policy.allows(packed_address(lan), 17, 53)


def test_sessions_with_equal_policies_share_one_compiled_lookup_and_changes_apply_at_once():
    sync, registry, counters = syncing()
    eng, sales = access_policy(f"{LAN1}/32"), access_policy(f"{LAN2}/32 udp 53")
    sync.apply(installed(1, session(1, ALICE, keys(), policy=eng)))
    sync.apply(installed(2, session(2, BOB, keys(), policy=eng)))
    sync.apply(installed(3, session(3, "198.19.0.4", keys(), policy=sales)))
    assert registry.by_id[1].policy is registry.by_id[2].policy
    assert counters.policy_compiles == 2
    assert lan_allowed(registry, 1, LAN1) and not lan_allowed(registry, 1, LAN2)
    assert lan_allowed(registry, 3, LAN2) and not lan_allowed(registry, 3, LAN1)

    sync.apply(
        control_pb2.SessionEvent(
            revision=4, policy_changed=control_pb2.PolicyChange(session_id=1, policy=sales)
        )
    )
    assert sync.revision == counters.feed_revision == 4
    assert registry.by_id[1].policy is registry.by_id[3].policy  # the one sales lookup
    assert lan_allowed(registry, 1, LAN2) and not lan_allowed(registry, 1, LAN1)
    assert lan_allowed(registry, 2, LAN1)  # bob keeps eng's
    # a change for a session we do not hold moves the revision and nothing else
    sync.apply(
        control_pb2.SessionEvent(
            revision=5, policy_changed=control_pb2.PolicyChange(session_id=99, policy=eng)
        )
    )
    assert sync.revision == 5 and set(registry.by_id) == {1, 2, 3}
    # a policy no session holds any more is forgotten
    sync.apply(
        control_pb2.SessionEvent(
            revision=6, policy_changed=control_pb2.PolicyChange(session_id=2, policy=sales)
        )
    )
    gc.collect()
    assert len(sync.policies) == 1


def test_a_session_without_a_policy_or_with_a_bad_one_reaches_nothing(caplog):
    sync, registry, counters = syncing()
    bare = session(1, ALICE, keys())
    bare.ClearField("policy")
    sync.apply(installed(1, bare))
    assert registry.by_id[1].policy is NO_POLICY
    bad = access_policy(f"{LAN1}/32", "198.18.2.1/24 tcp 22")  # host bits set
    sync.apply(installed(2, session(2, BOB, keys(), policy=bad)))
    assert registry.by_id[2].policy is NO_POLICY
    assert counters.policies_refused == 1
    assert "access policy" in caplog.text and "refused" in caplog.text
    # a bad change replaces a good policy with nothing, not with the old one
    sync.apply(installed(3, session(3, "198.19.0.4", keys(), policy=access_policy(f"{LAN1}/32"))))
    sync.apply(
        control_pb2.SessionEvent(
            revision=4, policy_changed=control_pb2.PolicyChange(session_id=3, policy=bad)
        )
    )
    assert registry.by_id[3].policy is NO_POLICY


def test_a_relisting_brings_each_session_to_its_listed_policy():
    sync, registry, _ = syncing()
    sync.apply(installed(1, session(1, ALICE, keys(), policy=access_policy(f"{LAN1}/32"))))
    listed = session(1, ALICE, keys(), policy=access_policy(f"{LAN2}/32"))
    sync.reconcile(control_pb2.ListSessionsResponse(sessions=[listed], revision=9))
    assert lan_allowed(registry, 1, LAN2) and not lan_allowed(registry, 1, LAN1)
    # and an install event for a known session (the auth service re-sent it) too
    again = session(1, ALICE, keys(), policy=access_policy(f"{LAN1}/32"))
    sync.apply(installed(10, again))
    assert lan_allowed(registry, 1, LAN1) and not lan_allowed(registry, 1, LAN2)


ROUTED_DESTINATIONS = [LAN1, LAN2, "198.18.3.4", "198.18.2.53", str(GATEWAY), BOB, ALICE]
# (offset, new bytes) that change one field of a routed packet: in the route key or not
FIELD_CHANGES = {
    "ip id": (4, b"\x12\x34"),
    "more fragments": (6, b"\x20\x00"),
    "a later fragment": (6, b"\x00\x10"),
    "ttl": (8, b"\x01"),
    "protocol": (9, b"\x11"),
    "source": (12, packed_address(BOB)),
    "destination": (16, packed_address("198.18.3.4")),
    "source port": (20, b"\x00\x17"),
    "destination port": (22, b"\x00\x17"),
    "icmp type": (20, b"\x08"),
    "payload": (30, b"\xff"),
}


def routed_packet(src: str, dst: str, protocol: int, dport: int, size: int) -> bytes:
    if protocol == 1:
        body = struct.pack("!BBHI", 8 if dport == 22 else 0, 0, 0, 0)
    else:
        body = struct.pack("!HH", 40000, dport) + bytes(16)
    return ipv4(src, dst, protocol, body + bytes(size))


def changed(packet: bytes, change: str | None, grow: int) -> bytes:
    out = bytearray(packet + bytes(grow))
    out[2:4] = len(out).to_bytes(2, "big")
    if change is not None:
        at, value = FIELD_CHANGES[change]
        out[at : at + len(value)] = value
    return bytes(out)


def test_packets_with_one_route_key_get_one_decision():
    """What the dataplane relies on when it decides a run of one flow's packets
    once (routing.route_key, Device._inbound): the same key, both within the MTU,
    the same decision. Every packet of a grid (sender, destination, protocol,
    port, size) against itself with each one field changed, in the key or not,
    and longer or not."""
    router, alice, bob = make_world()
    compared = 0
    for sender, src in ((alice, ALICE), (bob, BOB)):
        for dst in ROUTED_DESTINATIONS:
            for protocol in (6, 17, 1):
                for dport in (22, 23, 53):
                    for size in (0, 1300):
                        first = routed_packet(src, dst, protocol, dport, size)
                        key = route_key(first)
                        assert key is not None
                        expected = router.from_session(sender, first)
                        for change in (None, *FIELD_CHANGES):
                            for grow in (0, 100, 1500):
                                second = changed(first, change, grow)
                                if route_key(second) != key or len(second) > router.mtu:
                                    continue
                                assert router.from_session(sender, second) == expected, (
                                    dst, protocol, dport, change, grow
                                )  # fmt: skip
                                compared += 1
    assert compared > 1000


def test_a_route_key_is_read_from_ipv4_without_options_only():
    packet = ipv4_udp(ALICE, LAN1, 1, 2, b"x")
    assert route_key(packet) is not None
    assert route_key(bytes([0x46]) + packet[1:]) is None  # options: not read
    assert route_key(packet[:23]) is None
    v6 = bytes([0x60]) + bytes(60)
    assert route_key(v6) is None
