"""Cryptokey routing decisions (pure: no I/O, no clock).

A decrypted packet must come from an address its session owns; it goes to the
session that owns its destination (hub), or to the TUN unless the destination is forbidden
(destinations.py: the gateway host itself, link-local, denied networks). Either way
its session's access policy must allow it (push_protocol/policy.py), except a
service the gateway offers on purpose; a packet to another client also passes as a
reply: when the receiving session's policy allows the flow the other way (a
stateless reverse check, docs/protocol.md "Access policy"). A packet read from the
TUN goes only to the session that owns its destination, unchecked: replies to what
a client reached are never refused. Addresses are raw header bytes, as the
registry indexes them.
"""

import struct
from enum import IntEnum
from typing import NamedTuple

from push_protocol.drops import DropReason, PacketRejected

from . import inner
from .destinations import DestinationPolicy
from .registry import Registry, SessionRecord


class Action(IntEnum):
    TUN = 1  # write to the server TUN
    SESSION = 2  # seal and send to `target`
    TOO_BIG = 3  # answer with ICMP "too big", count a drop
    DROP = 4  # count a drop with `reason`


class Decision(NamedTuple):
    action: Action
    target: SessionRecord | None = None
    reason: DropReason | None = None


# The common answers, built once: a NamedTuple costs more than the lookups here.
TO_TUN = Decision(Action.TUN)
NO_ROUTE = Decision(Action.DROP, reason=DropReason.NO_ROUTE)
SPOOFED = Decision(Action.DROP, reason=DropReason.SPOOFED_SOURCE)
FORBIDDEN = Decision(Action.DROP, reason=DropReason.FORBIDDEN_DESTINATION)
POLICY_DENIED = Decision(Action.DROP, reason=DropReason.POLICY_DENIED)


# IPv4 without options: flags and fragment offset, TTL, protocol; the addresses and
# the first 4 bytes of the transport header (ports; ICMP's type, code and checksum)
_ROUTE_KEY = struct.Struct("!6xI2x12s")


def route_key(packet: bytes) -> tuple | None:
    """What decides `Router.from_session` for `packet`, besides its length, where
    that is cheap to read: IPv4 without options. Two packets of one session with
    the same key, neither over the MTU, get the same decision at one moment
    (tests/test_dataplane_access.py), so a run of one flow's packets needs one
    decision. None for every other packet (IPv6, IPv4 with options, shorter than
    24 bytes), which is decided on its own."""
    if len(packet) < 24 or packet[0] != 0x45:
        return None
    return _ROUTE_KEY.unpack_from(packet)


class Router:
    def __init__(
        self,
        registry: Registry,
        tunnel_network,
        gateway_address,
        mtu: int,
        destinations: DestinationPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.mtu = mtu
        self.destinations = destinations or DestinationPolicy(gateway_address)
        self._gateway = gateway_address.packed
        self._net_len = len(tunnel_network.network_address.packed)
        self._net = int(tunnel_network.network_address)
        self._mask = int(tunnel_network.netmask)

    def from_session(self, record: SessionRecord, packet: bytes) -> Decision:
        try:
            source, destination = inner.addresses(packet)
        except PacketRejected as rejected:
            return Decision(Action.DROP, reason=rejected.reason)
        if source not in record.addresses:
            return SPOOFED
        if len(packet) > self.mtu:
            return Decision(Action.TOO_BIG, record, DropReason.TOO_BIG)
        target = self.registry.by_address.get(destination)
        if target is not None:  # client to client: allowed, or a reply to an allowed flow
            if record.policy.allows_packet(packet, destination) or target.policy.allows_reply(
                packet, source
            ):
                return Decision(Action.SESSION, target)
            return POLICY_DENIED
        if self.destinations.refuses(packet, destination):
            return FORBIDDEN
        if (  # in the tunnel network, but nobody's: not for the TUN either
            destination != self._gateway
            and len(destination) == self._net_len
            and int.from_bytes(destination, "big") & self._mask == self._net
        ):
            return NO_ROUTE
        if record.policy.allows_packet(packet, destination) or self.destinations.offers(
            packet, destination
        ):
            return TO_TUN
        return POLICY_DENIED

    def from_tun(self, packet: bytes) -> Decision:
        try:
            destination = inner.addresses(packet)[1]
        except PacketRejected as rejected:
            return Decision(Action.DROP, reason=rejected.reason)
        target = self.registry.by_address.get(destination)
        if target is None:
            return NO_ROUTE
        return Decision(Action.SESSION, target)
