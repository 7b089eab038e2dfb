"""Access policy: where a client's packets may go (pure: no I/O, no clock).

A policy is a list of rules, each "this prefix, this protocol (0: any), these
destination ports (none: every port)"; a packet passes if some rule allows its
destination, protocol and destination port (docs/protocol.md, "Access policy").
Everything else is refused: a session without a policy reaches nothing.

`compile_policy` turns the rules into a lookup whose per-packet cost barely
grows with their number: the address space of each family is cut into disjoint
intervals at every rule's first and last address (prefixes are nested or
disjoint, so a sweep keeps a chain of at most 33 or 129 of them), each interval
carries what is allowed there (`EVERYTHING`, nothing, or a table protocol ->
sorted port ranges), equal allowances are one object, and a destination is
found by bisection: O(log rules), a few hundred nanoseconds for 10,000 rules.
A small per-destination cache in front of it makes the common case one dict
lookup; it is cleared when full, so a client spraying destinations costs memory
bounded by CACHE_ENTRIES and falls back to the bisection.

"icmp" is one rule for both families: protocol 1 allows ICMPv6 (58) to an IPv6
prefix and 58 allows ICMP (1) to an IPv4 one. Ports apply to TCP and UDP; a rule
with ports and protocol 0 allows TCP and UDP to those ports. A later fragment
(no ports in it) passes where its protocol is allowed at some port: the first
fragment, which carries the ports and without which nothing is reassembled, is
checked in full, and one too short to hold its ports is refused.

Replies: `allows_reply` answers whether a packet is a reply to a flow this
policy allows in the other direction (a stateless reverse check, used for
client-to-client packets: the receiver's policy allows the flow towards the
sender, ports swapped; an ICMP echo reply or error where ICMP is allowed back or
where the error quotes an allowed packet). A TCP segment that opens a
connection (SYN without ACK) is never a reply.
"""

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

ANY = 0
ICMP = 1
TCP = 6
UDP = 17
ICMPV6 = 58
PORT_PROTOCOLS = (TCP, UDP)
ALL_PORTS = (0, 65535)
CACHE_ENTRIES = 256  # destinations remembered per compiled policy

# IPv6 extension headers walked to find the transport header (a bounded number).
_HOP_BY_HOP, _ROUTING, _FRAGMENT, _DESTINATION_OPTIONS, _AUTH = 0, 43, 44, 60, 51
_MAX_EXTENSION_HEADERS = 8
_NO_TRANSPORT = -1  # a protocol no rule allows: the header chain is truncated or too long

ECHO_REPLY = {ICMP: 0, ICMPV6: 129}
ICMP_ERRORS = {ICMP: frozenset((3, 4, 5, 11, 12)), ICMPV6: frozenset((1, 2, 3, 4))}
_ICMP_FOR = {4: ICMP, 6: ICMPV6}


class PolicyError(ValueError):
    """A rule that cannot be one (bad prefix, protocol or port range): bad input
    from whoever sent the policy, refused whole."""


@dataclass(frozen=True)
class Rule:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    protocol: int = ANY
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: every port

    @classmethod
    def make(cls, destination: str, protocol: int = ANY, ports: Iterable = ()) -> "Rule":
        """A rule from its parts as the feed carries them, checked."""
        try:
            network = ipaddress.ip_network(destination)  # strict: no host bits
        except ValueError as error:
            raise PolicyError(f"destination {destination!r}: {error}") from None
        if not 0 <= protocol <= 255:
            raise PolicyError(f"protocol {protocol} is not an IP protocol number")
        ranges = tuple((int(first), int(last)) for first, last in ports)
        for first, last in ranges:
            if not 0 <= first <= last <= 65535:
                raise PolicyError(f"port range {first}-{last}")
        if ranges and protocol not in (ANY, *PORT_PROTOCOLS):
            raise PolicyError(f"ports given for protocol {protocol}, which has none")
        return cls(network, protocol, ranges)


def rules_from_messages(messages: Iterable) -> list[Rule]:
    """Rules from objects with `destination`, `protocol` and `ports` (each with
    `first` and `last`): the feed's AccessRule messages."""
    return [
        Rule.make(m.destination, m.protocol, ((r.first, r.last) for r in m.ports)) for m in messages
    ]


class _Everything:
    """Every protocol, every port."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EVERYTHING"


EVERYTHING = _Everything()
_MISSING = object()

# An allowance is EVERYTHING, None (nothing), or a dict protocol -> ports, where
# ports is None (every port) or something `port in ports` answers (`_ports`).
# Built from canonical keys: EVERYTHING, or a tuple of (protocol, ranges or None).


def merge_ports(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Port ranges sorted, with overlapping and adjacent ones merged."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple((first, last) for first, last in merged)


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...] | None:
    merged = merge_ports(ranges)
    return None if merged == (ALL_PORTS,) else merged


def _rule_key(rule: Rule, version: int):
    """The canonical allowance of one rule at a prefix of IP `version`."""
    protocol = rule.protocol
    if protocol in (ICMP, ICMPV6):
        protocol = _ICMP_FOR[version]
    if not rule.ports:
        return EVERYTHING if protocol == ANY else ((protocol, None),)
    ranges = _merge_ranges(rule.ports)
    protocols = PORT_PROTOCOLS if protocol == ANY else (protocol,)
    return tuple((p, ranges) for p in protocols)


def _union(a, b):
    """The canonical allowance allowing what `a` or `b` allows (None: nothing)."""
    if a is None:
        return b
    if b is None:
        return a
    if a is EVERYTHING or b is EVERYTHING:
        return EVERYTHING
    table: dict[int, list | None] = {}
    for protocol, ranges in (*a, *b):
        if protocol in table and table[protocol] is None:
            continue
        if ranges is None:
            table[protocol] = None
        else:
            table.setdefault(protocol, []).extend(ranges)
    return tuple(
        (protocol, None if ranges is None else _merge_ranges(ranges))
        for protocol, ranges in sorted(table.items())
    )


class _Family:
    """Disjoint address intervals of one IP family and what each allows."""

    __slots__ = ("allowances", "starts")

    def __init__(self, rules: list[Rule], version: int, intern) -> None:
        own: dict = {}  # network -> canonical allowance of the rules naming it
        for rule in rules:
            own[rule.network] = _union(own.get(rule.network), _rule_key(rule, version))
        # parents before children: by first address, then shorter prefix first
        networks = sorted(own, key=lambda n: (int(n.network_address), n.prefixlen))
        starts, keys = [0], [None]
        chain: list[tuple[int, object]] = []  # (last address, cumulative allowance), nested

        def cut(at: int, key) -> None:
            if starts[-1] == at:
                keys[-1] = key
            elif keys[-1] != key:
                starts.append(at)
                keys.append(key)

        def close_until(address: int) -> None:
            while chain and chain[-1][0] < address:
                last = chain.pop()[0]
                cut(last + 1, chain[-1][1] if chain else None)

        for network in networks:
            first = int(network.network_address)
            close_until(first)
            cumulative = _union(chain[-1][1] if chain else None, own[network])
            chain.append((int(network.broadcast_address), cumulative))
            cut(first, cumulative)
        close_until(1 << (32 if version == 4 else 128))
        if starts[-1] == 1 << (32 if version == 4 else 128):  # past the last address
            starts.pop()
            keys.pop()
        self.starts = tuple(starts)
        self.allowances = tuple(intern(key) for key in keys)

    def lookup(self, value: int):
        return self.allowances[bisect_right(self.starts, value) - 1]


class PortRanges:
    """Sorted disjoint inclusive port ranges, for `port in ranges` (bisection)."""

    __slots__ = ("ends", "starts")

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self.starts = tuple(first for first, _ in ranges)
        self.ends = tuple(last for _, last in ranges)

    def __contains__(self, port: int) -> bool:
        index = bisect_right(self.starts, port) - 1
        return index >= 0 and port <= self.ends[index]


PORT_SET_MAX = 1024  # several ranges of at most this many ports in all: a frozenset


def _ports(ranges: tuple[tuple[int, int], ...]):
    """The fastest `in` for these ranges: a range, a frozenset or PortRanges."""
    if len(ranges) == 1:
        return range(ranges[0][0], ranges[0][1] + 1)
    if sum(last - first + 1 for first, last in ranges) <= PORT_SET_MAX:
        return frozenset(port for first, last in ranges for port in range(first, last + 1))
    return PortRanges(ranges)


def _allowance(key):
    if key is None or key is EVERYTHING:
        return key
    return {protocol: None if ranges is None else _ports(ranges) for protocol, ranges in key}


def transport(packet: bytes) -> tuple[int, int, bool]:
    """(protocol, offset of its header, later fragment) of an IPv4 or IPv6 packet
    whose header was checked (dataplane/inner.py). IPv6 extension headers are
    walked; a chain that is truncated or longer than a few gives a protocol no
    rule names (refused unless everything is allowed)."""
    if packet[0] >> 4 == 4:
        return packet[9], (packet[0] & 0x0F) * 4, bool(packet[6] & 0x1F or packet[7])
    protocol, offset, later = packet[6], 40, False
    for _ in range(_MAX_EXTENSION_HEADERS):
        if protocol not in (_HOP_BY_HOP, _ROUTING, _FRAGMENT, _DESTINATION_OPTIONS, _AUTH):
            return protocol, offset, later
        if len(packet) < offset + 8:
            break
        if protocol == _FRAGMENT:
            later = later or bool((packet[offset + 2] << 8 | packet[offset + 3]) & 0xFFF8)
            length = 8
        elif protocol == _AUTH:
            length = (packet[offset + 1] + 2) * 4
        else:
            length = (packet[offset + 1] + 1) * 8
        protocol, offset = packet[offset], offset + length
    return _NO_TRANSPORT, offset, later


class CompiledPolicy:
    """A policy ready for per-packet checks. Immutable but for its cache; share
    one among sessions with the same rules."""

    __slots__ = ("__weakref__", "_cache", "_v4", "_v6", "digest", "rule_count")

    def __init__(self, rules: Iterable[Rule], digest: str = "") -> None:
        rules = list(rules)
        self.digest = digest
        self.rule_count = len(rules)
        interned: dict = {}

        def intern(key):
            if key not in interned:
                interned[key] = _allowance(key)
            return interned[key]

        self._v4 = _Family([r for r in rules if r.network.version == 4], 4, intern)
        self._v6 = _Family([r for r in rules if r.network.version == 6], 6, intern)
        self._cache: dict[bytes, object] = {}

    def allowance(self, destination: bytes):
        """What is allowed to `destination` (4 or 16 raw bytes): EVERYTHING, None
        (nothing) or a table protocol -> None (every port) or ports (`port in`)."""
        found = self._cache.get(destination, _MISSING)
        return self._look_up(destination) if found is _MISSING else found

    def _look_up(self, destination: bytes):
        cache = self._cache
        family = self._v4 if len(destination) == 4 else self._v6
        found = family.lookup(int.from_bytes(destination, "big"))
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        cache[destination] = found
        return found

    def allows(self, destination: bytes, protocol: int, port: int | None = None) -> bool:
        """Whether a packet of `protocol` to `destination` (raw bytes) and
        destination `port` (None: a packet without one) passes."""
        found = self.allowance(destination)
        if found is EVERYTHING:
            return True
        if found is None:
            return False
        ports = found.get(protocol, _MISSING)
        if ports is None:
            return True
        if ports is _MISSING or port is None:
            return False
        return port in ports

    def allows_packet(self, packet: bytes, destination: bytes) -> bool:
        """Whether an IP packet (header checked) to `destination` (its raw
        destination address) passes: the check for every packet from a client."""
        found = self._cache.get(destination, _MISSING)  # allowance(), inline: per packet
        if found is _MISSING:
            found = self._look_up(destination)
        if found is EVERYTHING:
            return True
        if found is None:
            return False
        if len(destination) == 4:
            ports = found.get(packet[9], _MISSING)
            if ports is None:
                return True
            if ports is _MISSING:
                return False
            if packet[6] & 0x1F or packet[7]:  # a later fragment: the first had the ports
                return True
            header = (packet[0] & 0x0F) * 4
        else:
            protocol, header, later = transport(packet)
            ports = found.get(protocol, _MISSING)
            if ports is None:
                return True
            if ports is _MISSING:
                return False
            if later:
                return True
        if len(packet) < header + 4:
            return False
        return (packet[header + 2] << 8 | packet[header + 3]) in ports

    def allows_reply(self, packet: bytes, source: bytes) -> bool:
        """Whether `packet`, from `source` (raw) to the owner of this policy, is a
        reply to a flow this policy allows from its owner to `source`."""
        found = self.allowance(source)
        if found is None:
            return False
        protocol, header, later = transport(packet)
        if protocol in (TCP, UDP):
            if later:
                return found is EVERYTHING or protocol in found
            if len(packet) < header + 4 or (
                protocol == TCP and len(packet) > header + 13 and packet[header + 13] & 0x12 == 0x02
            ):
                return False  # no ports, or a TCP SYN: opens a connection, answers nothing
            if found is EVERYTHING:
                return True
            ports = found.get(protocol, _MISSING)
            return ports is None or (
                ports is not _MISSING and (packet[header] << 8 | packet[header + 1]) in ports
            )
        if protocol in (ICMP, ICMPV6):
            if later or len(packet) <= header:
                return False
            icmp_type = packet[header]
            if icmp_type == ECHO_REPLY[protocol]:
                return found is EVERYTHING or protocol in found
            if icmp_type not in ICMP_ERRORS[protocol]:
                return False
            if found is EVERYTHING or protocol in found:
                return True
            return self._quotes_allowed(packet[header + 8 :], source)
        if protocol == _NO_TRANSPORT:
            return False
        return found is EVERYTHING or found.get(protocol, _MISSING) is None

    def _quotes_allowed(self, quoted: bytes, source: bytes) -> bool:
        """Whether an ICMP error quotes a packet this policy lets its owner send to
        `source` (the host that reports the error about it)."""
        if not quoted or len(quoted) < (20 if quoted[0] >> 4 == 4 else 40):
            return False
        version = quoted[0] >> 4
        if version == 4 and len(source) == 4 and (quoted[0] & 0x0F) >= 5:
            destination = quoted[16:20]
        elif version == 6 and len(source) == 16:
            destination = quoted[24:40]
        else:
            return False
        return destination == source and self.allows_packet(quoted, destination)


NO_POLICY = CompiledPolicy(())  # reaches nothing
ALLOW_ALL = CompiledPolicy((Rule.make("0.0.0.0/0"), Rule.make("::/0")), "allow-all")


def compile_policy(rules: Iterable[Rule], digest: str = "") -> CompiledPolicy:
    return CompiledPolicy(rules, digest)
