"""The inner IP packet: addresses, and the ICMP/MSS fixes the dataplane applies.

Pure functions on bytes. Addresses are kept as the raw 4 or 16 header bytes:
that is what the registry indexes by, so no per-packet object is built.
"""

import struct

from push_protocol.drops import DropReason, PacketRejected


class InnerMalformed(PacketRejected):
    """The decrypted payload is not an IPv4 or IPv6 packet."""

    reason = DropReason.INNER_MALFORMED


IPV4_HEADER_MIN = 20
IPV6_HEADER_LEN = 40
PROTO_TCP = 6
PROTO_ICMP = 1
PROTO_ICMPV6 = 58


def addresses(packet: bytes) -> tuple[bytes, bytes]:
    """(source, destination) of an IPv4 or IPv6 packet, as raw bytes."""
    if not packet:
        raise InnerMalformed("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_HEADER_MIN or (packet[0] & 0x0F) < 5:
            raise InnerMalformed("truncated IPv4 header")
        return packet[12:16], packet[16:20]
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            raise InnerMalformed("truncated IPv6 header")
        return packet[8:24], packet[24:40]
    raise InnerMalformed(f"IP version {version}")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def too_big_reply(packet: bytes, mtu: int, source: bytes) -> bytes | None:
    """ICMP "fragmentation needed" / ICMPv6 "packet too big" for `packet`, from `source`.

    None when no reply is due: an IPv4 packet without DF may be fragmented, and
    ICMP errors are never sent about ICMP errors.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        header_len = (packet[0] & 0x0F) * 4
        if header_len < IPV4_HEADER_MIN or len(packet) <= header_len:
            return None
        if not packet[6] & 0x40:  # DF not set: the packet may be fragmented instead
            return None
        if packet[9] == PROTO_ICMP and packet[header_len] in (3, 11, 12):
            return None  # never an ICMP error about an ICMP error
        quoted = packet[: header_len + 8]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        total = 20 + len(icmp)
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, PROTO_ICMP, 0, source, packet[12:16]
        )
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + icmp
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            return None
        if packet[6] == PROTO_ICMPV6 and len(packet) > 40 and packet[40] < 128:
            return None
        quoted = packet[: 1280 - 48]  # the reply must fit the IPv6 minimum MTU
        body = struct.pack("!BBHI", 2, 0, 0, mtu) + quoted
        destination = packet[8:24]
        pseudo = source + destination + struct.pack("!I3xB", len(body), PROTO_ICMPV6)
        body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
        header = struct.pack(
            "!IHBB16s16s", 0x60000000, len(body), PROTO_ICMPV6, 64, source, destination
        )
        return header + body
    return None


def clamp_mss(packet: bytes, max_mss: int, partial: bool = False) -> bytes:
    """`packet` with a TCP SYN's MSS option lowered to `max_mss` (checksum fixed up,
    unless `partial`: a checksum field holding only the pseudo-header sum, which
    the option is not part of; pushgate_io/tso.py).

    Anything that is not a TCP SYN with a larger MSS is returned unchanged.
    """
    if len(packet) < IPV4_HEADER_MIN:
        return packet
    version = packet[0] >> 4
    if version == 4:
        header_len = (packet[0] & 0x0F) * 4
        if packet[9] != PROTO_TCP or packet[6] & 0x1F or packet[7]:  # not TCP, or a fragment
            return packet
    elif version == 6:
        header_len = 40
        if packet[6] != PROTO_TCP:
            return packet
    else:
        return packet
    tcp = header_len
    if len(packet) < tcp + 20 or not packet[tcp + 13] & 0x02:  # no SYN
        return packet
    data_offset = (packet[tcp + 12] >> 4) * 4
    end = min(tcp + data_offset, len(packet))
    i = tcp + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2:
            break
        length = packet[i + 1]
        if kind == 2 and length == 4 and i + 4 <= end:
            mss = struct.unpack_from("!H", packet, i + 2)[0]
            if mss <= max_mss:
                return packet
            out = bytearray(packet)
            struct.pack_into("!H", out, i + 2, max_mss)
            if partial:
                return bytes(out)
            # Incremental checksum update (RFC 1624): HC' = ~(~HC + ~m + m').
            old_sum = struct.unpack_from("!H", out, tcp + 16)[0]
            total = (~old_sum & 0xFFFF) + (~mss & 0xFFFF) + max_mss
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            struct.pack_into("!H", out, tcp + 16, ~total & 0xFFFF)
            return bytes(out)
        i += length
    return packet
