"""Receive offload for TUN writes: consecutive segments of a flow become one write.

Writing a packet to a TUN costs a system call and a pass through the kernel's
IP and TCP receive path; for a bulk TCP stream that is most of what a Python
dataplane spends (docs/performance.md). A TUN opened with IFF_VNET_HDR takes,
with every write, a virtio-net header that can describe a GSO super-packet:
one IPv4 + TCP header followed by many segments' payloads, which the kernel
takes as one packet, as if the NIC had done GRO. wireguard-go does the same in
tun/offload_linux.go; this is our own, smaller version of the idea.

Pure code, no I/O: `coalesce(packets)` groups a batch of IP packets into
writes, each a list of buffers for `os.writev` (the first one the 10-byte
virtio-net header) and the number of packets it carries, in the order of each
write's first packet; packets of one TCP flow keep their order.

A TCP segment joins the previous one of its flow only when the kernel's GRO
would merge them too: IPv4 without options or fragmentation, TCP with only ACK
(and PSH on the last segment), payload not empty, the next sequence number,
identical TOS, DF, TTL, ACK number, window and TCP options, no segment larger
than the first and nothing after a shorter one, and at most MAX_SEGMENTS
segments or 64 KiB in all. UDP datagrams of one flow (addresses and ports) are
merged the same way where the kernel takes UDP GSO packets from a TUN (USO,
Linux 6.2+; `LinuxTun` probes for it): IPv4 without options or fragmentation,
identical TOS, DF and TTL, none larger than the first and nothing after a
shorter one, at most UDP_MAX_SEGMENTS or 64 KiB; the kernel cuts the write back
into the same datagrams (only the IP ids are renumbered). Everything else
(IPv6, pure ACKs, SYN/FIN/RST, ICMP) is written on its own with an empty header.

The merged packet is marked NEEDS_CSUM: its TCP or UDP checksum field holds the
pseudo-header sum and the kernel completes it. The segments' own checksums
are therefore not verified here (summing 1.4 KB in Python costs about as much
as the write it saves): each segment was authenticated end to end by the AEAD,
so a wrong inner checksum can only come from the client's own sender, and the
effect is that such a segment is delivered with a correct checksum instead of
being dropped by the receiving stack.
"""

import struct

from . import tso
from .tso import F_NEEDS_CSUM, GSO_TCPV4, PROTO_TCP, VNET_HDR, VNET_HDR_LEN, fold

PLAIN_HEADER = bytes(VNET_HDR_LEN)  # no GSO, no checksum offload
GSO_UDP_L4 = 5  # Linux 6.2+ takes it from a TUN (USO)
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
MAX_SEGMENTS = 44  # 44 x 1460 < 65535 - 40; the kernel's GRO merges at most 64
_MAX_IP_LEN = 65535

_ACK, _PSH = 0x10, 0x08
PROTO_UDP = 17
UDP_MAX_SEGMENTS = 64  # the kernel refuses a UDP GSO packet of more
_IP_WORDS = struct.Struct("!10H")
# IPv4 header without options, then the TCP header without options; the fields
# nobody compares (IP id and checksum, TCP checksum) are skipped:
# tos, total length, flags+fragment offset, ttl, addresses and ports,
# seq, ack, data offset, TCP flags, window, urgent pointer
_IPV4_TCP = struct.Struct("!xBHxxHBxxx12sIIBBHxxH")
# IPv4 header without options, then the UDP header: tos, total length,
# flags+fragment offset, ttl, addresses and ports, UDP length
_IPV4_UDP = struct.Struct("!xBHxxHBxxx12sH")


class _Flow:
    __slots__ = (
        "count",
        "gso_size",
        "header_len",
        "limit",
        "next_seq",
        "parts",
        "protocol",
        "psh",
        "signature",
    )

    def __init__(self, protocol: int, packet: bytes, header_len: int, sig) -> None:
        self.protocol = protocol
        self.parts = [PLAIN_HEADER, packet]
        self.count = 1
        self.header_len = header_len
        self.gso_size = len(packet) - header_len
        # segments one write can carry: the kernel's limits, and 64 KiB in all
        self.limit = min(
            MAX_SEGMENTS if protocol == PROTO_TCP else UDP_MAX_SEGMENTS,
            (_MAX_IP_LEN - header_len) // self.gso_size,
        )
        self.signature = sig
        self.psh = 0
        # TCP: the sequence number the next segment must have; UDP: 0. Both: -1
        # once nothing more may join (after a shorter segment, or a PSH).
        self.next_seq = -1


def python_coalesce(
    packets: list[bytes], *, udp: bool = True, partial_tcp: bool = False
) -> list[tuple[list, int]]:
    """The writes for `packets`: (buffers for writev, packets carried) each.
    `udp=False` writes UDP datagrams one by one (a kernel without USO).
    `partial_tcp`: the TCP packets `tso.tcp_offset` covers carry partial checksums
    (pushgate_io/tso.py), so those written alone are marked NEEDS_CSUM too.

    The reference implementation: `coalesce` is pushgate_io/_gro.c's where it was
    built (tests/test_offload_compiled.py shows both give the same writes)."""
    writes: list = []  # (buffers, 1) or a _Flow, in the order of first packets
    tcp_flows: dict[bytes, _Flow] = {}
    udp_flows: dict[bytes, _Flow] = {}
    merged: list[_Flow] = []
    unpack_tcp, unpack_udp = _IPV4_TCP.unpack_from, _IPV4_UDP.unpack_from
    for packet in packets:
        length = len(packet)
        if length < 29 or packet[0] != 0x45:  # IPv4 without options, with a payload
            writes.append(([PLAIN_HEADER, packet], 1))
            continue
        protocol = packet[9]
        if protocol == PROTO_TCP and length >= 41:
            tos, total, frag, ttl, key, seq, ack, offset, flags, window, urgent = unpack_tcp(packet)
            header_len = 20 + ((offset >> 4) << 2)
            size = length - header_len
            if (
                frag & 0x3FFF  # MF or a fragment offset
                or flags & ~_PSH != _ACK  # ACK, maybe PSH, nothing else
                or size <= 0
                or header_len < 40
                or total != length
            ):
                writes.append(([PLAIN_HEADER, packet], 1))
                continue
            # what must be equal between merged segments: TOS, DF, TTL, ACK number,
            # data offset, window, urgent pointer and TCP options
            signature = (tos, frag, ttl, ack, offset, window, urgent, packet[40:header_len])
            flow = tcp_flows.get(key)  # key: addresses and ports
            if (
                flow is not None
                and seq == flow.next_seq
                and size <= flow.gso_size
                and flow.count < flow.limit
                and signature == flow.signature
            ):
                if flow.count == 1:
                    merged.append(flow)
                flow.parts.append(packet[header_len:])
                flow.count += 1
                if size < flow.gso_size or flags & _PSH:  # the last one this write can take
                    flow.psh = flags & _PSH
                    flow.next_seq = -1
                else:
                    flow.next_seq = (seq + size) & 0xFFFFFFFF
                continue
            flow = _Flow(PROTO_TCP, packet, header_len, signature)
            if flags & _PSH:
                flow.psh = _PSH
            else:
                flow.next_seq = (seq + size) & 0xFFFFFFFF
            tcp_flows[key] = flow
            writes.append(flow)
        elif protocol == PROTO_UDP and udp:
            tos, total, frag, ttl, key, udp_length = unpack_udp(packet)
            if frag & 0x3FFF or total != length or udp_length != length - 20:
                writes.append(([PLAIN_HEADER, packet], 1))
                continue
            signature = (tos, frag, ttl)
            size = length - 28
            flow = udp_flows.get(key)
            if (
                flow is not None
                and flow.next_seq == 0
                and size <= flow.gso_size
                and flow.count < flow.limit
                and signature == flow.signature
            ):
                if flow.count == 1:
                    merged.append(flow)
                flow.parts.append(packet[28:])
                flow.count += 1
                if size < flow.gso_size:
                    flow.next_seq = -1
                continue
            flow = _Flow(PROTO_UDP, packet, 28, signature)
            flow.next_seq = 0
            udp_flows[key] = flow
            writes.append(flow)
        else:
            writes.append(([PLAIN_HEADER, packet], 1))
    for flow in merged:
        _finish(flow)
    out = [(w.parts, w.count) if type(w) is _Flow else w for w in writes]
    if partial_tcp:
        for buffers, count in out:
            if count == 1 and buffers[0] is PLAIN_HEADER:
                offset = tso.tcp_offset(buffers[1])
                if offset:
                    buffers[0] = _partial_header(offset)
    return out


def coalesce(
    packets: list[bytes], *, udp: bool = True, partial_tcp: bool = False
) -> list[tuple[list, int]]:
    """`python_coalesce`, compiled where it was built (tso.COMPILED; a merged write
    is then two buffers: the virtio-net header and the whole packet)."""
    return tso.compiled.coalesce(packets, udp, partial_tcp)


if not tso.COMPILED:
    coalesce = python_coalesce


def _partial_header(offset: int) -> bytes:
    """The virtio-net header of one packet whose TCP checksum the kernel completes."""
    return VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, offset, TCP_CSUM_OFFSET)


def _finish(flow: _Flow) -> None:
    """Turn [PLAIN_HEADER, first packet, payloads...] into one GSO write."""
    parts = flow.parts
    first = parts[1]
    header_len = flow.header_len
    total = header_len + flow.gso_size + sum(map(len, parts[2:]))
    head = bytearray(first[:header_len])
    head[2:4] = total.to_bytes(2, "big")
    head[10:12] = b"\0\0"
    head[10:12] = (~fold(sum(_IP_WORDS.unpack_from(head))) & 0xFFFF).to_bytes(2, "big")
    l4_length = total - 20
    pseudo = (
        (head[12] << 8 | head[13])
        + (head[14] << 8 | head[15])
        + (head[16] << 8 | head[17])
        + (head[18] << 8 | head[19])
        + flow.protocol
        + l4_length
    )
    if flow.protocol == PROTO_TCP:
        head[33] = (head[33] & ~_PSH) | flow.psh  # PSH as the last segment had it
        head[36:38] = fold(pseudo).to_bytes(2, "big")
        gso_type, csum_offset = GSO_TCPV4, TCP_CSUM_OFFSET
    else:
        head[24:26] = l4_length.to_bytes(2, "big")
        head[26:28] = fold(pseudo).to_bytes(2, "big")
        gso_type, csum_offset = GSO_UDP_L4, UDP_CSUM_OFFSET
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso_type, header_len, flow.gso_size, 20, csum_offset)
    parts[:2] = [vnet, head, first[header_len:]]
