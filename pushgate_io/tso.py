"""TUN reads with TSO: a super-packet cut into segments, and partial checksums.

With TUNSETOFFLOAD TUN_F_CSUM | TUN_F_TSO4 the kernel hands a TUN reader a
whole GSO super-packet of a TCP flow per read (up to 64 KiB, one IPv4 and TCP
header for many segments), instead of one read per segment: the read per
packet was 27 % of the dataplane's work on a download (docs/performance.md).
wireguard-go does the same in tun/offload_linux.go; this is our own version.

The price is checksums: the kernel leaves a TCP or UDP checksum to whoever
sends the packet on (CHECKSUM_PARTIAL: the field holds only the pseudo-header
sum), and summing 1.4 KB in Python costs more than the read it saves. So the
dataplane does not complete TCP checksums for clients whose kernel can
(LoginRequest.completes_checksums; docs/protocol.md, "Partial checksums"):

- `packets(data)` turns one read into packets in the *partial TCP form*: every
  TCP packet in the rule (`tcp_offset`) carries the pseudo-header sum in its
  checksum field (cut segments, partial ones as the kernel gave them, and
  complete ones rewritten, which reads no payload); every other packet is
  complete (a partial UDP one is completed here, the rare case).
- `complete(packet)` completes a TCP packet of that form, for a client that
  cannot (WinTun, or an older client), at the cost of the sum.
- `to_partial(packet)` brings a complete TCP packet into the form (a packet
  from another client, through the hub).

Pure code, no I/O.
"""

import contextlib
import os
import struct

from push_protocol.codec import PURE_PYTHON_ENV

# struct virtio_net_hdr, in the host's byte order (the TUN default), before every
# read and write of a TUN with IFF_VNET_HDR (gro.py writes it too):
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = 10
VNET_HDR = struct.Struct("=BBHHHH")
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_ECN = 0, 1, 0x80
PROTO_TCP = 6
_FIN_PSH, _CWR = 0x09, 0x80


def tcp_offset(packet) -> int:
    """Where the TCP header starts, for the packets the partial form covers: IPv4
    TCP that is not a fragment, and IPv6 whose first next header is TCP; 0 for
    every other packet (a packet too short for an IPv4 header among them)."""
    if len(packet) < 20:
        return 0
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) << 2
        if (
            packet[9] == PROTO_TCP
            and not (packet[6] & 0x3F or packet[7])
            and len(packet) >= ihl + 20
        ):
            return ihl
    elif version == 6 and packet[6] == PROTO_TCP and len(packet) >= 60:
        return 40
    return 0


def ones_sum(data) -> int:
    """The 16-bit ones' complement sum of `data` (RFC 1071), 0 only for all zeros:
    the sum of a number's 16-bit words is the number modulo 0xFFFF."""
    value = int.from_bytes(data, "big") << (8 if len(data) & 1 else 0)
    folded = value % 0xFFFF
    return folded if folded or not value else 0xFFFF


def _pseudo_sum(packet, offset: int) -> int:
    """The pseudo-header sum (not complemented) of a TCP packet of the form."""
    length = len(packet) - offset
    addresses = packet[12:20] if offset != 40 or packet[0] >> 4 == 4 else packet[8:40]
    return ones_sum(addresses) + PROTO_TCP + length


def fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def python_to_partial(packet: bytes) -> bytes:
    """A complete TCP packet in the partial form (others as they are)."""
    offset = tcp_offset(packet)
    if not offset:
        return packet
    out = bytearray(packet)
    out[offset + 16 : offset + 18] = fold(_pseudo_sum(packet, offset)).to_bytes(2, "big")
    return bytes(out)


def python_complete(packet: bytes) -> bytes:
    """A TCP packet of the partial form with its checksum completed (others as
    they are)."""
    offset = tcp_offset(packet)
    if not offset:
        return packet
    out = bytearray(packet)
    out[offset + 16 : offset + 18] = (0xFFFF - ones_sum(memoryview(packet)[offset:])).to_bytes(
        2, "big"
    )
    return bytes(out)


def python_packets(data: bytes) -> list[bytes]:
    """One read of a TUN with IFF_VNET_HDR and TSO (virtio-net header, then a
    packet), as packets in the partial TCP form. A read the kernel should never
    give (a GSO type other than TCPv4, a header too short) stands as one empty
    packet, which the dataplane's router drops, counted, as `inner_malformed`."""
    if len(data) <= VNET_HDR_LEN:
        return [b""]
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    packet = data[VNET_HDR_LEN:]
    gso_type &= ~GSO_ECN
    if gso_type == GSO_TCPV4:
        return python_segments(packet, gso_size) or [b""]
    if gso_type != GSO_NONE:
        return [b""]
    offset = tcp_offset(packet)
    if flags & F_NEEDS_CSUM:
        if offset:  # partial already: the form
            return [packet]
        return [_completed_at(packet, csum_start, csum_offset)]
    return [python_to_partial(packet)] if offset else [packet]


def _completed_at(packet: bytes, start: int, field: int) -> bytes:
    """A partial packet other than TCP (UDP from the gateway host) completed where
    the kernel said: the sum from `start`, into the 2 bytes at start + field."""
    end = start + field
    if end + 2 > len(packet):
        return packet
    out = bytearray(packet)
    checksum = 0xFFFF - ones_sum(memoryview(packet)[start:])
    out[end : end + 2] = (checksum or 0xFFFF).to_bytes(2, "big")  # UDP: 0 means none
    return bytes(out)


def python_segments(packet: bytes, gso_size: int) -> list[bytes]:
    """An IPv4 TCP super-packet cut into segments of `gso_size` payload bytes, each
    with its own IP length, id and header checksum, sequence number, flags (FIN
    and PSH on the last only, CWR on the first only) and a partial checksum.

    Every segment but the first and the last has the same length and flags, so
    its header differs from the one before only in IP id, IP checksum and
    sequence number: two `pack_into` calls a segment."""
    offset = tcp_offset(packet)
    if not offset or packet[0] >> 4 != 4 or gso_size <= 0:
        return []
    header_len = offset + ((packet[offset + 12] >> 4) << 2)
    if header_len > len(packet) or header_len < offset + 20:
        return []
    head = bytearray(packet[:header_len])
    # the IP header's sum without total length, id and checksum, which change
    words = struct.unpack_from(f"!{offset // 2}H", head)
    ip_base = sum(words) - words[1] - words[2] - words[5]
    first_id = words[2]
    middle = (words[3], head[8], head[9])  # fragment field, TTL, protocol: kept
    first_seq = int.from_bytes(head[offset + 4 : offset + 8], "big")
    flags = head[offset + 13]
    pseudo_base = ones_sum(head[12:20]) + PROTO_TCP + header_len - offset
    data = memoryview(packet)
    end = len(packet)
    starts = range(header_len, end, gso_size)
    last = len(starts) - 1
    out = []
    join = b"".join
    # the segments of gso_size: length, flags (neither first nor last) and TCP sum
    full = header_len + gso_size
    _set_length(head, offset, full, flags & ~(_FIN_PSH | _CWR), fold(pseudo_base + gso_size))
    ip_full = ip_base + full
    for index, start in enumerate(starts):
        ip_id = (first_id + index) & 0xFFFF
        seq = (first_seq + start - header_len) & 0xFFFFFFFF
        if 0 < index < last:
            _ID_CSUM.pack_into(head, 4, ip_id, *middle, 0xFFFF - (ip_full + ip_id) % 0xFFFF)
            _SEQ.pack_into(head, offset + 4, seq)
            out.append(join((head, data[start : start + gso_size])))
            continue
        size = min(gso_size, end - start)
        total = header_len + size
        edge = bytearray(head)  # the first or the last: its own length and flags
        segment_flags = flags if index == last else flags & ~_FIN_PSH
        if index:
            segment_flags &= ~_CWR
        _set_length(edge, offset, total, segment_flags, fold(pseudo_base + size))
        _ID_CSUM.pack_into(edge, 4, ip_id, *middle, 0xFFFF - (ip_base + total + ip_id) % 0xFFFF)
        _SEQ.pack_into(edge, offset + 4, seq)
        out.append(join((edge, data[start : start + size])))
    return out


# The compiled offloads (pushgate_io/_offload.c: these three, its `segments`,
# which `packets` cuts with, and gro.coalesce) where they were built, unless
# PUSHGATE_PURE_PYTHON is set; the python_ functions here are the reference
# (tests/test_offload_compiled.py shows both equal).
compiled = None
if not os.environ.get(PURE_PYTHON_ENV):
    with contextlib.suppress(ImportError):  # not built here (Windows): the reference runs
        from . import _offload as compiled
COMPILED = compiled is not None
if compiled is not None:
    packets, complete, to_partial = compiled.packets, compiled.complete, compiled.to_partial
else:
    packets, complete, to_partial = python_packets, python_complete, python_to_partial

_ID_CSUM = struct.Struct("!HHBBH")  # IP id, fragment field, TTL, protocol, checksum
_SEQ = struct.Struct("!I")


def _set_length(head: bytearray, offset: int, total: int, flags: int, tcp_sum: int) -> None:
    head[2:4] = total.to_bytes(2, "big")
    head[offset + 13] = flags
    head[offset + 16 : offset + 18] = tcp_sum.to_bytes(2, "big")
