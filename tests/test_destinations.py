"""Where clients' packets may not go (dataplane/destinations.py), its config, and the
router's use of it: pure, no I/O."""

import ipaddress
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.destinations import ALWAYS_DENIED, DestinationPolicy, parse_ip_addresses
from dataplane.registry import Registry, SessionRecord, packed_address
from dataplane.routing import TO_TUN, Action, Router
from netlab.packets import ipv4, ipv4_tcp_syn, ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.drops import DropReason
from push_protocol.keys import Role
from push_protocol.policy import ALLOW_ALL
from push_protocol.session import TunnelSession
from pushgate_io import gateway_config as config

GATEWAY = ipaddress.ip_address("198.19.0.1")
CLIENT = "198.19.0.2"
DNS = config.OfferedService("udp", GATEWAY, 53)


def ping(src: str, dst: str) -> bytes:
    return ipv4(src, dst, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping")


def ipv6_udp(src: str, dst: str, dport: int) -> bytes:
    udp = struct.pack("!HHHH", 4000, dport, 8, 0)
    header = struct.pack("!IHBB", 0x60000000, len(udp), 17, 64)
    return header + packed_address(src) + packed_address(dst) + udp


def refuses(policy: DestinationPolicy, packet: bytes) -> bool:
    offset = 24 if packet[0] >> 4 == 6 else 16
    return policy.refuses(packet, packet[offset : offset + (16 if offset == 24 else 4)])


def test_link_local_loopback_multicast_and_broadcast_are_refused():
    policy = DestinationPolicy(GATEWAY)
    for destination in ("169.254.169.254", "127.0.0.1", "224.0.0.251", "239.255.255.250"):
        assert refuses(policy, ipv4_udp(CLIENT, destination, 4000, 80, b"x")), destination
    assert refuses(policy, ipv4_udp(CLIENT, "255.255.255.255", 68, 67, b"x"))
    assert refuses(policy, ipv4_udp(CLIENT, "0.0.0.0", 4000, 80, b"x"))
    for destination in ("fe80::1", "ff02::fb", "::1"):
        assert refuses(policy, ipv6_udp("2001:db8::2", destination, 53)), destination
    # the rest of the world, next to those: open
    for destination in ("198.18.2.2", "169.253.255.255", "169.255.0.1", "223.255.255.255"):
        assert not refuses(policy, ipv4_udp(CLIENT, destination, 4000, 80, b"x")), destination
    assert not refuses(policy, ipv6_udp("2001:db8::2", "2001:db8::53", 53))
    assert not refuses(policy, ipv6_udp("2001:db8::2", "fec0::1", 53))  # just past fe80::/10


def test_the_gateway_host_is_refused_except_what_it_offers():
    policy = DestinationPolicy(GATEWAY)  # offers ping to its tunnel address, by default
    assert not refuses(policy, ping(CLIENT, "198.19.0.1"))
    assert refuses(policy, ipv4_udp(CLIENT, "198.19.0.1", 4000, 53, b"x"))
    assert refuses(policy, ipv4_tcp_syn(CLIENT, "198.19.0.1", 4000, 9102, 1460))
    # its other addresses only once read (the tunnel address is its own from the start)
    assert not refuses(policy, ipv4_tcp_syn(CLIENT, "198.18.2.1", 4000, 9102, 1460))
    policy.set_host_addresses([ipaddress.ip_address("198.18.2.1")])
    assert refuses(policy, ipv4_tcp_syn(CLIENT, "198.18.2.1", 4000, 9102, 1460))
    assert refuses(policy, ping(CLIENT, "198.18.2.1"))  # ping offered on the tunnel address only
    assert refuses(policy, ipv4_tcp_syn(CLIENT, "198.19.0.1", 4000, 9102, 1460))
    policy.set_host_addresses([])  # an address removed from the host is open again
    assert not refuses(policy, ipv4_tcp_syn(CLIENT, "198.18.2.1", 4000, 9102, 1460))


def test_offered_services_by_protocol_and_port():
    policy = DestinationPolicy(GATEWAY, offered=[DNS])
    assert not refuses(policy, ipv4_udp(CLIENT, "198.19.0.1", 4000, 53, b"query"))
    assert refuses(policy, ipv4_udp(CLIENT, "198.19.0.1", 4000, 54, b"query"))
    assert refuses(policy, ipv4_tcp_syn(CLIENT, "198.19.0.1", 4000, 53, 1460))  # TCP not offered
    assert refuses(policy, ping(CLIENT, "198.19.0.1"))  # only what is listed
    udp = ipv4_udp(CLIENT, "198.19.0.1", 4000, 53, b"query")
    later_fragment = udp[:6] + b"\x00\x10" + udp[8:]  # offset 128 bytes: no port in it
    assert refuses(policy, later_fragment)
    assert refuses(policy, udp[:22])  # too short to hold the port
    other = ipv4(CLIENT, "198.19.0.1", 47, bytes(8))  # GRE: no port, not offered
    assert refuses(policy, other)


def test_denied_networks_and_services_offered_inside_them():
    management = ipaddress.ip_network("198.18.128.0/24")
    wide = ipaddress.ip_network("240.0.0.0/7")  # shorter than /8: two first bytes
    everything_v6 = ipaddress.ip_network("::/0")
    offered = [config.OfferedService("tcp", ipaddress.ip_address("198.18.128.53"), 53)]
    policy = DestinationPolicy(GATEWAY, [management, wide, everything_v6], offered)
    assert refuses(policy, ipv4_udp(CLIENT, "198.18.128.9", 4000, 9090, b"x"))
    assert not refuses(policy, ipv4_udp(CLIENT, "198.18.129.9", 4000, 9090, b"x"))
    assert not refuses(policy, ipv4_tcp_syn(CLIENT, "198.18.128.53", 4000, 53, 1460))
    assert refuses(policy, ipv4_udp(CLIENT, "240.1.2.3", 4000, 80, b"x"))
    assert refuses(policy, ipv4_udp(CLIENT, "241.1.2.3", 4000, 80, b"x"))
    assert not refuses(policy, ipv4_udp(CLIENT, "242.1.2.3", 4000, 80, b"x"))
    assert refuses(policy, ipv6_udp("2001:db8::2", "2001:db8::53", 53))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**128 - 1), st.sampled_from([0, 8, 12, 16]))
def test_the_first_byte_table_decides_as_the_networks_do(v4, v6, extra_len):
    """The fast lookup equals asking every denied network (and the host set)."""
    extra = ipaddress.ip_network((v4 & ~((1 << (32 - extra_len)) - 1), extra_len))
    host = ipaddress.ip_address((v4 ^ 1) or 1)
    policy = DestinationPolicy(GATEWAY, [extra], offered=[])
    policy.set_host_addresses([host])
    for value in (v4, v4 ^ 1, 0xA9FE0000 | (v4 & 0xFFFF), v4 & 0xFFFFFF | 0xE0000000):
        address = ipaddress.IPv4Address(value)
        expected = (
            address in {host, GATEWAY}
            or address in extra
            or any(address in network for network in ALWAYS_DENIED if network.version == 4)
        )
        assert refuses(policy, ipv4_udp(CLIENT, str(address), 1, 2, b"")) == expected, address
    for value in (v6, 0xFE80 << 112 | (v6 & ((1 << 112) - 1)), 1):
        address = ipaddress.IPv6Address(value)
        expected = any(address in network for network in ALWAYS_DENIED if network.version == 6)
        assert refuses(policy, ipv6_udp("2001:db8::2", str(address), 53)) == expected, address


def test_the_router_counts_forbidden_destinations_apart(key_material):
    def record(session_id: int, address: str) -> SessionRecord:
        tunnel = TunnelSession(session_id, CipherSuite.AES_256_GCM, Role.SERVER, key_material)
        return SessionRecord(tunnel, (packed_address(address),), 0.0, policy=ALLOW_ALL)

    registry = Registry()
    alice, bob = record(1, CLIENT), record(2, "198.19.0.3")
    registry.add(alice)
    registry.add(bob)
    policy = DestinationPolicy(GATEWAY)
    router = Router(registry, ipaddress.ip_network("198.19.0.0/24"), GATEWAY, 1420, policy)
    metadata = router.from_session(alice, ipv4_tcp_syn(CLIENT, "169.254.169.254", 1, 80, 1400))
    assert metadata.reason is DropReason.FORBIDDEN_DESTINATION
    assert router.from_session(alice, ping(CLIENT, "198.19.0.1")) is TO_TUN
    assert router.from_session(alice, ipv4_udp(CLIENT, "198.18.2.2", 1, 2, b"x")) is TO_TUN
    hub = router.from_session(alice, ipv4_udp(CLIENT, "198.19.0.3", 1, 2, b"x"))
    assert hub.action is Action.SESSION and hub.target is bob
    # a spoofed source stays a spoof, whatever its destination
    spoofed = router.from_session(alice, ipv4_udp("198.19.0.9", "169.254.169.254", 1, 2, b"x"))
    assert spoofed.reason is DropReason.SPOOFED_SOURCE


IP_ADDRESS_JSON = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {
        "ifname": "br0",
        "addr_info": [
            {"family": "inet", "local": "198.18.1.1", "prefixlen": 24, "broadcast": "198.18.1.255"},
            {"family": "inet6", "local": "fe80::1%br0", "prefixlen": 64},
        ],
    },
    {"ifname": "pg0", "addr_info": [{"family": "inet", "local": "198.19.0.1", "prefixlen": 24}]},
    {"ifname": "down0", "addr_info": []},
]


def test_host_addresses_from_ip_json():
    assert parse_ip_addresses(json.dumps(IP_ADDRESS_JSON)) == {
        ipaddress.ip_address(a)
        for a in ("127.0.0.1", "198.18.1.1", "198.18.1.255", "fe80::1", "198.19.0.1")
    }


CONFIG = """
[gateway]
tunnel_network = "198.19.0.0/24"
gateway_address = "198.19.0.1"
[dataplane]
"""


def load(tmp_path, dataplane: str = "") -> config.GatewayConfig:
    path = tmp_path / "pushgate.toml"
    path.write_text(CONFIG + dataplane)
    return config.load(str(path))


def test_config_defaults_and_lists(tmp_path):
    default = load(tmp_path).dataplane
    assert default.deny_networks == ()
    assert default.offered_services == (config.OfferedService("ping", GATEWAY, None),)
    listed = load(
        tmp_path,
        'deny_networks = ["198.18.128.0/24", "2001:db8:1::/48"]\n'
        'offered_services = ["udp 198.19.0.1:53", "tcp [2001:db8::1]:53"]\n',
    ).dataplane
    assert listed.deny_networks == (
        ipaddress.ip_network("198.18.128.0/24"),
        ipaddress.ip_network("2001:db8:1::/48"),
    )
    assert listed.offered_services == (
        DNS,
        config.OfferedService("tcp", ipaddress.ip_address("2001:db8::1"), 53),
    )
    assert load(tmp_path, "offered_services = []\n").dataplane.offered_services == ()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('deny_networks = ["198.18.128.1/24"]', r"deny_networks: .*has host bits set"),
        ('deny_networks = "198.18.128.0/24"', "deny_networks: expected list"),
        ('offered_services = ["udp 198.19.0.1"]', "services: 'udp 198.19.0.1': expected HOST:PORT"),
        ('offered_services = ["udp :53"]', "'udp :53': an address is required"),
        ('offered_services = ["ping gateway"]', "'ping gateway': .*does not appear to be"),
        ('offered_services = ["sctp 198.19.0.1:53"]', 'expected "ping ADDRESS"'),
        ('offered_services = ["udp 198.19.0.1:99999"]', "expected HOST:PORT"),
    ],
)
def test_config_errors_name_the_key_and_entry(tmp_path, line, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, line + "\n")


def test_init_writes_the_lists_and_offers_dns_and_what_it_is_told_to(tmp_path):
    from auth_service import admin

    common = ["init", "--dataplane-endpoint", "198.18.0.1:51820", "--server-name", "198.18.0.1"]
    assert admin.main([*common, "--dir", str(tmp_path / "plain")]) == 0
    plain = config.load(str(tmp_path / "plain" / "pushgate.toml")).dataplane
    assert plain.offered_services == (config.OfferedService("ping", GATEWAY, None),)
    assert plain.deny_networks == ()
    extra = ["--dns", "198.19.0.1", "--deny-network", "198.18.128.0/24"]
    assert admin.main([*common, "--dir", str(tmp_path / "dns"), *extra]) == 0
    dns = config.load(str(tmp_path / "dns" / "pushgate.toml")).dataplane
    assert dns.offered_services == (
        config.OfferedService("ping", GATEWAY, None),
        DNS,
        config.OfferedService("tcp", GATEWAY, 53),
    )
    assert dns.deny_networks == (ipaddress.ip_network("198.18.128.0/24"),)
    offers = ["--offer", "tcp 198.19.0.1:5201", "--offer", "udp 198.19.0.1:5201"]
    assert admin.main([*common, "--dir", str(tmp_path / "offers"), *offers]) == 0
    offered = config.load(str(tmp_path / "offers" / "pushgate.toml")).dataplane
    assert offered.offered_services == (
        config.OfferedService("ping", GATEWAY, None),
        config.OfferedService("tcp", GATEWAY, 5201),
        config.OfferedService("udp", GATEWAY, 5201),
    )
