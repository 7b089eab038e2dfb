"""Where a client's packets may not go (pure: no I/O, no clock).

Deny by default (DESIGN.md, invariant 12): nothing inside the tunnel reaches the
gateway host itself (any of its addresses, which the caller reads at start and
re-reads now and then), link-local addresses (cloud metadata at
169.254.169.254), loopback, multicast and broadcast, or the networks the config
denies (compose and management networks), except the services the gateway
offers on purpose (`[dataplane] offered_services`, by default ping to the
gateway's tunnel address). A refused packet is a `forbidden_destination` drop.

The check runs for every packet, so it costs a set lookup plus an index into a
table of denied prefixes by the address' first byte: only a destination whose
first byte a denied prefix shares is compared with prefixes.
"""

import ipaddress
import json
from collections.abc import Iterable

from pushgate_io.gateway_config import OfferedService

# Never a destination for a client: link-local (cloud metadata, and the gateway's
# own fe80:: addresses), loopback and "this host", multicast and the limited
# broadcast (the kernel delivers those locally, to the gateway's own listeners).
ALWAYS_DENIED = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    )
)

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
PING = {4: (1, 8), 6: (58, 128)}  # (protocol, ICMP type of an echo request) by IP version
_PORTS = (6, 17)
_ICMP = (1, 58)


def service_key(service: OfferedService) -> tuple[bytes, int]:
    """(address, protocol << 16 | port or ICMP type): what `DestinationPolicy` reads
    from a packet."""
    if service.protocol == "ping":
        protocol, icmp_type = PING[service.address.version]
        return service.address.packed, protocol << 16 | icmp_type
    return service.address.packed, PROTOCOL_NUMBERS[service.protocol] << 16 | service.port


class DestinationPolicy:
    def __init__(
        self,
        gateway_address,
        deny_networks: Iterable = (),
        offered: Iterable[OfferedService] | None = None,
    ) -> None:
        if offered is None:  # as `[dataplane] offered_services` when not set
            offered = (OfferedService("ping", gateway_address, None),)
        # the tunnel address is the host's even before the first read of its addresses
        self._gateway = gateway_address
        self.host_addresses: frozenset[bytes] = frozenset({gateway_address.packed})
        self._offered: dict[bytes, frozenset[int]] = {}  # by address: what is offered there
        for service in offered:
            address, key = service_key(service)
            self._offered[address] = self._offered.get(address, frozenset()) | {key}
        self.denied = (*ALWAYS_DENIED, *deny_networks)
        # by first byte of the destination: ((network, mask), ...) for IPv4 and for IPv6
        tables: dict[int, list[list]] = {4: [[] for _ in range(256)], 6: [[] for _ in range(256)]}
        for network in self.denied:
            bits = network.max_prefixlen
            value, mask = int(network.network_address), int(network.netmask)
            first = value >> (bits - 8)
            span = 1 << max(0, 8 - network.prefixlen)  # a prefix under /8 covers several
            for byte in range(first, first + span):
                tables[network.version][byte].append((value, mask))
        self._v4 = tuple(tuple(prefixes) for prefixes in tables[4])
        self._v6 = tuple(tuple(prefixes) for prefixes in tables[6])

    def set_host_addresses(self, addresses: Iterable) -> None:
        """The gateway host's addresses now (local and broadcast, every interface)."""
        self.host_addresses = frozenset({self._gateway.packed, *(a.packed for a in addresses)})

    def refuses(self, packet: bytes, destination: bytes) -> bool:
        """Whether a client may not send `packet` (an IP packet whose destination
        address, raw, is `destination`) into the gateway's network."""
        if destination not in self.host_addresses:
            prefixes = (self._v4 if len(destination) == 4 else self._v6)[destination[0]]
            if not prefixes:
                return False  # the common case: nothing denied starts with this byte
            value = int.from_bytes(destination, "big")
            for network, mask in prefixes:
                if value & mask == network:
                    break
            else:
                return False
        return not self.offers(packet, destination)

    def offers(self, packet: bytes, destination: bytes) -> bool:
        """Whether `packet` is for a service the gateway offers on purpose at
        `destination`: reachable whatever the session's access policy says."""
        offered = self._offered.get(destination)
        if offered is None:
            return False
        # protocol << 16 | port or ICMP type, as plain integers: this runs for every
        # packet to the gateway's own services
        if len(destination) == 4:
            header = (packet[0] & 0x0F) * 4
            if packet[6] & 0x1F or packet[7]:  # a later fragment: no port in it
                return False
            protocol = packet[9]
        else:  # IPv6: only a transport header right after the fixed one
            header, protocol = 40, packet[6]
        if protocol in _PORTS and len(packet) >= header + 4:
            return (protocol << 16 | packet[header + 2] << 8 | packet[header + 3]) in offered
        if protocol in _ICMP and len(packet) > header:
            return (protocol << 16 | packet[header]) in offered
        return False


def parse_ip_addresses(text: str) -> set:
    """The local and broadcast addresses in `ip -j address show` output."""
    addresses = set()
    for interface in json.loads(text):
        for info in interface.get("addr_info", ()):
            for key in ("local", "broadcast"):
                if key in info:
                    addresses.add(ipaddress.ip_address(info[key].split("%")[0]))
    return addresses
