"""The access policy's compiled lookup (push_protocol/policy.py) against a naive
reference (some rule matches), on random rules, and its packet-level checks."""

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netlab.packets import ipv4, ipv4_tcp_syn, ipv4_udp
from push_protocol.policy import (
    ALLOW_ALL,
    ANY,
    CACHE_ENTRIES,
    ICMP,
    ICMPV6,
    NO_POLICY,
    TCP,
    UDP,
    PolicyError,
    Rule,
    compile_policy,
    rules_from_messages,
)
from pushgate_api import control_pb2

PROTOCOLS = (ANY, ICMP, TCP, UDP, ICMPV6, 47)


def reference(rules: list[Rule], destination: bytes, protocol: int, port: int | None) -> bool:
    """Some rule allows it: the meaning, without any cleverness."""
    address = ipaddress.ip_address(destination)
    for rule in rules:
        if address not in rule.network:
            continue
        rule_protocol = rule.protocol
        if rule_protocol in (ICMP, ICMPV6):  # "icmp" is the family's ICMP
            rule_protocol = ICMP if address.version == 4 else ICMPV6
        if rule_protocol != ANY and rule_protocol != protocol:
            continue
        if not rule.ports:
            return True
        if protocol not in (TCP, UDP) or port is None:
            continue
        if any(first <= port <= last for first, last in rule.ports):
            return True
    return False


# Small address spaces so that random rules overlap and nest often.
V4_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))


@st.composite
def networks(draw):
    if draw(st.booleans()):
        length = draw(st.integers(16, 32))
        offset = draw(st.integers(0, 0xFFFF)) >> (32 - length) << (32 - length)
        return ipaddress.IPv4Network((V4_BASE + offset, length))
    length = draw(st.integers(112, 128))
    offset = draw(st.integers(0, 0xFFFF)) >> (128 - length) << (128 - length)
    return ipaddress.IPv6Network((V6_BASE + offset, length))


port_ranges = st.lists(
    st.tuples(st.integers(0, 65535), st.integers(0, 2000)).map(
        lambda t: (t[0], min(65535, t[0] + t[1]))
    ),
    max_size=3,
)


@st.composite
def rules(draw):
    network = draw(networks())
    protocol = draw(st.sampled_from(PROTOCOLS))
    ports = draw(port_ranges) if protocol in (ANY, TCP, UDP) else []
    return Rule.make(str(network), protocol, ports)


@st.composite
def destinations(draw):
    if draw(st.booleans()):
        return (V4_BASE + draw(st.integers(0, 0xFFFF))).to_bytes(4, "big")
    return (V6_BASE + draw(st.integers(0, 0xFFFF))).to_bytes(16, "big")


ports = st.one_of(st.none(), st.integers(0, 65535))


@settings(max_examples=300, deadline=None)
@given(st.lists(rules(), max_size=12), st.lists(st.tuples(destinations(), ports), max_size=20))
def test_the_compiled_lookup_agrees_with_some_rule_matches(rule_list, probes):
    policy = compile_policy(rule_list)
    for destination, port in probes:
        for protocol in (TCP, UDP, ICMP, ICMPV6, 47):
            probe_port = port if protocol in (TCP, UDP) else None
            assert policy.allows(destination, protocol, probe_port) == reference(
                rule_list, destination, protocol, probe_port
            ), (rule_list, destination, protocol, probe_port)


@settings(max_examples=200, deadline=None)
@given(st.lists(rules(), max_size=12), destinations(), st.integers(0, 65535))
def test_the_rules_next_to_a_destination_are_checked_at_the_edges_too(rule_list, _, port):
    """Every rule's first and last address and the ones just outside: where
    intervals are cut."""
    policy = compile_policy(rule_list)
    for rule in rule_list:
        bits = rule.network.max_prefixlen
        for value in (
            int(rule.network.network_address) - 1,
            int(rule.network.network_address),
            int(rule.network.broadcast_address),
            int(rule.network.broadcast_address) + 1,
        ):
            destination = (value % (1 << bits)).to_bytes(bits // 8, "big")
            for protocol in (TCP, ICMP, ICMPV6, 47):
                probe_port = port if protocol == TCP else None
                assert policy.allows(destination, protocol, probe_port) == reference(
                    rule_list, destination, protocol, probe_port
                )


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def test_no_policy_reaches_nothing_and_allow_all_everything():
    for destination in (v4("198.18.2.10"), ipaddress.IPv6Address("2001:db8::1").packed):
        assert not NO_POLICY.allows(destination, TCP, 22)
        assert ALLOW_ALL.allows(destination, TCP, 22)
        assert ALLOW_ALL.allows(destination, 47)


def test_a_rule_for_the_whole_space_and_the_last_address():
    policy = compile_policy([Rule.make("0.0.0.0/0", TCP, [(443, 443)])])
    assert policy.allows(v4("255.255.255.255"), TCP, 443)
    assert not policy.allows(v4("255.255.255.255"), TCP, 444)
    top = compile_policy([Rule.make("255.255.255.255/32")])
    assert top.allows(v4("255.255.255.255"), UDP, 1)
    assert not top.allows(v4("255.255.255.254"), UDP, 1)


@pytest.mark.parametrize(
    ("destination", "protocol", "ports", "error"),
    [
        ("198.18.2.10/24", ANY, (), "host bits"),
        ("198.18.2.0/33", ANY, (), "198.18.2.0/33"),
        ("nonsense", ANY, (), "nonsense"),
        ("198.18.2.0/24", 256, (), "protocol 256"),
        ("198.18.2.0/24", TCP, [(10, 9)], "port range 10-9"),
        ("198.18.2.0/24", TCP, [(1, 65536)], "port range 1-65536"),
        ("198.18.2.0/24", ICMP, [(1, 2)], "ports given for protocol 1"),
    ],
)
def test_a_rule_that_cannot_be_one_is_refused(destination, protocol, ports, error):
    with pytest.raises(PolicyError, match=error):
        Rule.make(destination, protocol, ports)


def test_rules_from_the_feeds_messages():
    message = control_pb2.AccessPolicy(
        allow=[
            control_pb2.AccessRule(destination="198.18.2.10/32"),
            control_pb2.AccessRule(
                destination="198.18.3.0/24",
                protocol=TCP,
                ports=[control_pb2.PortRange(first=22, last=22)],
            ),
        ]
    )
    assert rules_from_messages(message.allow) == [
        Rule(ipaddress.ip_network("198.18.2.10/32")),
        Rule(ipaddress.ip_network("198.18.3.0/24"), TCP, ((22, 22),)),
    ]


# -- whole packets --------------------------------------------------------------

ENG = compile_policy(
    [
        Rule.make("198.18.2.10/32"),
        Rule.make("198.18.3.0/24", TCP, [(22, 22), (443, 443), (8000, 8999)]),
        Rule.make("198.18.3.0/24", UDP, [(53, 53)]),
        Rule.make("198.18.3.0/24", ICMP),
        Rule.make("2001:db8:3::/64", ICMP),
    ]
)


def tcp(src, dst, sport, dport, flags=0x10):
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 1000, 0, 0)
    return ipv4(src, dst, TCP, segment)


def icmp(src, dst, icmp_type, body=b"\0" * 4):
    return ipv4(src, dst, ICMP, struct.pack("!BBH", icmp_type, 0, 0) + body)


def ipv6(src, dst, next_header, body):
    return (
        struct.pack("!IHBB", 6 << 28, len(body), next_header, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + body
    )


@pytest.mark.parametrize(
    ("packet", "allowed"),
    [
        (ipv4_udp("198.19.0.2", "198.18.2.10", 1000, 9, b"x"), True),  # any protocol there
        (ipv4_tcp_syn("198.19.0.2", "198.18.3.7", 40000, 22, 1400), True),
        (ipv4_tcp_syn("198.19.0.2", "198.18.3.7", 40000, 8999, 1400), True),
        (ipv4_tcp_syn("198.19.0.2", "198.18.3.7", 40000, 9000, 1400), False),
        (ipv4_udp("198.19.0.2", "198.18.3.7", 1000, 53, b"x"), True),
        (ipv4_udp("198.19.0.2", "198.18.3.7", 1000, 22, b"x"), False),
        (icmp("198.19.0.2", "198.18.3.7", 8), True),
        (icmp("198.19.0.2", "198.18.2.11", 8), False),
        (ipv4("198.19.0.2", "198.18.3.7", TCP, b"\0\x16"), False),  # too short for its ports
        (ipv4("198.19.0.2", "198.18.3.7", 47, b"gre!"), False),
        # ICMPv6 under the "icmp" rule of an IPv6 prefix
        (ipv6("2001:db8:ff::2", "2001:db8:3::1", ICMPV6, b"\x80\0\0\0"), True),
        (ipv6("2001:db8:ff::2", "2001:db8:4::1", ICMPV6, b"\x80\0\0\0"), False),
        # behind a hop-by-hop header (8 bytes of options)
        (
            ipv6(
                "2001:db8:ff::2", "2001:db8:3::1", 0, bytes([ICMPV6, 0]) + b"\1\4\0\0\0\0\x80\0\0\0"
            ),
            True,
        ),
        # a truncated extension header chain: nothing to check, refused
        (ipv6("2001:db8:ff::2", "2001:db8:3::1", 0, bytes([ICMPV6, 0])), False),
    ],
)
def test_a_packet_passes_where_a_rule_allows_its_destination_protocol_and_port(packet, allowed):
    destination = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
    assert ENG.allows_packet(packet, destination) is allowed


def test_a_later_fragment_passes_where_its_protocol_is_allowed_at_some_port():
    first = bytearray(ipv4_udp("198.19.0.2", "198.18.3.7", 1000, 53, b"x" * 16))
    later = bytearray(first)
    later[6:8] = struct.pack("!H", 3)  # offset 24 bytes: no UDP header in it
    assert ENG.allows_packet(bytes(later), v4("198.18.3.7"))
    later[9] = 47  # a protocol not allowed there at all
    assert not ENG.allows_packet(bytes(later), v4("198.18.3.7"))
    assert not ENG.allows_packet(bytes(later), v4("198.18.4.7"))


def test_the_reverse_check_allows_replies_to_allowed_flows_only():
    server = v4("198.18.3.7")  # what ENG's owner reaches, as the replying side
    assert ENG.allows_reply(tcp("198.18.3.7", "198.19.0.2", 443, 40000), server)
    assert not ENG.allows_reply(tcp("198.18.3.7", "198.19.0.2", 444, 40000), server)
    # a SYN opens a connection: never a reply, even from an allowed port
    assert not ENG.allows_reply(tcp("198.18.3.7", "198.19.0.2", 443, 40000, flags=0x02), server)
    assert ENG.allows_reply(tcp("198.18.3.7", "198.19.0.2", 443, 40000, flags=0x12), server)
    assert ENG.allows_reply(ipv4_udp("198.18.3.7", "198.19.0.2", 53, 1000, b"x"), server)
    assert not ENG.allows_reply(ipv4_udp("198.18.3.7", "198.19.0.2", 54, 1000, b"x"), server)
    # ICMP allowed towards the sender: its echo replies and errors pass, requests do not
    assert ENG.allows_reply(icmp("198.18.3.7", "198.19.0.2", 0), server)
    assert ENG.allows_reply(icmp("198.18.3.7", "198.19.0.2", 3), server)
    assert not ENG.allows_reply(icmp("198.18.3.7", "198.19.0.2", 8), server)
    # towards a host where everything is allowed: any reply, still no SYN
    anything = v4("198.18.2.10")
    assert ENG.allows_reply(ipv4_udp("198.18.2.10", "198.19.0.2", 7, 1, b"x"), anything)
    assert ENG.allows_reply(ipv4("198.18.2.10", "198.19.0.2", 47, b"gre!"), anything)
    assert not ENG.allows_reply(tcp("198.18.2.10", "198.19.0.2", 1, 2, flags=0x02), anything)
    # nothing allowed towards the sender: nothing is a reply
    other = v4("198.18.4.1")
    assert not ENG.allows_reply(icmp("198.18.4.1", "198.19.0.2", 0), other)
    assert not ENG.allows_reply(ipv4_udp("198.18.4.1", "198.19.0.2", 53, 1000, b"x"), other)


def test_an_icmp_error_passes_back_when_it_quotes_an_allowed_packet():
    policy = compile_policy([Rule.make("198.18.3.0/24", UDP, [(53, 53)])])  # no ICMP back
    sent = ipv4_udp("198.19.0.2", "198.18.3.7", 1000, 53, b"x")
    error = icmp("198.18.3.7", "198.19.0.2", 3, b"\0" * 4 + sent[:28])
    assert policy.allows_reply(error, v4("198.18.3.7"))
    not_allowed = ipv4_udp("198.19.0.2", "198.18.3.7", 1000, 54, b"x")
    error = icmp("198.18.3.7", "198.19.0.2", 3, b"\0" * 4 + not_allowed[:28])
    assert not policy.allows_reply(error, v4("198.18.3.7"))
    # the quoted packet went to someone else than the error's sender
    elsewhere = ipv4_udp("198.19.0.2", "198.18.3.8", 1000, 53, b"x")
    error = icmp("198.18.3.7", "198.19.0.2", 3, b"\0" * 4 + elsewhere[:28])
    assert not policy.allows_reply(error, v4("198.18.3.7"))


def test_the_destination_cache_is_bounded_and_keeps_the_answers():
    policy = compile_policy([Rule.make("198.18.0.0/16", TCP, [(22, 22)])])
    for value in range(3 * CACHE_ENTRIES):
        destination = (V4_BASE + value).to_bytes(4, "big")
        assert policy.allows(destination, TCP, 22)
        assert not policy.allows(destination, TCP, 23)
        assert len(policy._cache) <= CACHE_ENTRIES


def test_ten_thousand_rules_compile_into_few_intervals_per_rule():
    rules = [
        Rule.make(str(ipaddress.IPv4Network((V4_BASE + (i << 4), 28))), TCP, [(i % 1000, i % 1000)])
        for i in range(10_000)
    ]
    policy = compile_policy(rules)
    assert len(policy._v4.starts) <= 2 * len(rules) + 1
    for i in (0, 4321, 9999):
        destination = (V4_BASE + (i << 4) + 3).to_bytes(4, "big")
        assert policy.allows(destination, TCP, i % 1000)
        assert not policy.allows(destination, TCP, i % 1000 + 1)


@st.composite
def any_packets(draw):
    """An IP header that passes dataplane/inner.py's check, then anything."""
    if draw(st.booleans()):
        head = bytes([0x40 | draw(st.integers(5, 15))]) + draw(st.binary(min_size=19, max_size=19))
    else:
        head = bytes([0x60 | draw(st.integers(0, 15))]) + draw(st.binary(min_size=39, max_size=39))
    body = bytearray(head + draw(st.binary(max_size=80)))
    if draw(st.booleans()):  # often a protocol (or extension header) the checks look into
        index = 9 if body[0] >> 4 == 4 else 6
        body[index] = draw(st.sampled_from((0, 1, 6, 17, 43, 44, 51, 58, 60)))
    return bytes(body)


# every address, only some protocols and ports: every packet's transport is read
EVERYWHERE_SOME = compile_policy(
    [
        Rule.make("0.0.0.0/0", TCP, [(22, 22), (80, 90)]),
        Rule.make("0.0.0.0/0", ICMP),
        Rule.make("::/0", UDP, [(53, 53), (1000, 3000)]),
        Rule.make("::/0", ICMP),
    ]
)


@settings(max_examples=500, deadline=None)
@given(any_packets())
def test_no_packet_makes_the_checks_raise(packet):
    source, destination = (
        (packet[12:16], packet[16:20])
        if packet[0] >> 4 == 4
        else (
            packet[8:24],
            packet[24:40],
        )
    )
    for policy in (ENG, ALLOW_ALL, NO_POLICY, EVERYWHERE_SOME):
        assert isinstance(policy.allows_packet(packet, destination), bool)
        assert isinstance(policy.allows_reply(packet, source), bool)
