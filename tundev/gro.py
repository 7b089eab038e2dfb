"""Receive offload for TUN writes: consecutive TCP segments become one write.

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

A segment joins the previous one of its flow only when the kernel's GRO would
merge them too: IPv4 without options or fragmentation, TCP with only ACK (and
PSH on the last segment), payload not empty, the next sequence number,
identical TOS, DF, TTL, ACK number, window and TCP options, no segment larger
than the first and nothing after a shorter one, and at most MAX_SEGMENTS
segments or 64 KiB in all. Everything else (IPv6, pure ACKs, SYN/FIN/RST, UDP,
ICMP) is written on its own with an empty header.

The merged packet is marked NEEDS_CSUM: its TCP checksum field holds the
pseudo-header sum and the kernel completes it. The segments' own TCP checksums
are therefore not verified here (summing 1.4 KB in Python costs about as much
as the write it saves): each segment was authenticated end to end by the AEAD,
so a wrong inner checksum can only come from the client's own sender, and the
effect is that such a segment is delivered with a correct checksum instead of
being dropped by the receiving stack.
"""

import struct

VNET_HDR_LEN = 10
PLAIN_HEADER = bytes(VNET_HDR_LEN)  # no GSO, no checksum offload
# struct virtio_net_hdr, in the host's byte order (the TUN default):
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_VNET_HDR = struct.Struct("=BBHHHH")
F_NEEDS_CSUM = 1
GSO_TCPV4 = 1
TCP_CSUM_OFFSET = 16
MAX_SEGMENTS = 44  # 44 x 1460 < 65535 - 40; the kernel's GRO merges at most 64
_MAX_IP_LEN = 65535

_ACK, _PSH = 0x10, 0x08
_IP_WORDS = struct.Struct("!10H")
# IPv4 header without options, then the TCP header without options; the fields
# nobody compares (IP id and checksum, TCP checksum) are skipped:
# tos, total length, flags+fragment offset, ttl, protocol, addresses and ports,
# seq, ack, data offset, TCP flags, window, urgent pointer
_IPV4_TCP = struct.Struct("!xBHxxHBB2x12sIIBBHxxH")


class _Flow:
    __slots__ = ("count", "gso_size", "header_len", "next_seq", "parts", "psh", "signature")

    def __init__(self, parts: list, header_len: int, gso_size: int, next_seq: int, sig) -> None:
        self.parts = parts
        self.count = 1
        self.header_len = header_len
        self.gso_size = gso_size
        self.next_seq = next_seq  # -1 once nothing more may join: after a shorter or PSH segment
        self.signature = sig
        self.psh = 0


def coalesce(packets: list[bytes]) -> list[tuple[list, int]]:
    """The writes for `packets`: (buffers for writev, packets carried) each."""
    writes: list = []  # (buffers, 1) or a _Flow, in the order of first packets
    flows: dict[bytes, _Flow] = {}
    merged: list[_Flow] = []
    unpack = _IPV4_TCP.unpack_from
    for packet in packets:
        length = len(packet)
        if length < 41 or packet[0] != 0x45:  # IPv4 without options
            writes.append(([PLAIN_HEADER, packet], 1))
            continue
        tos, total, frag, ttl, proto, key, seq, ack, offset, flags, window, urgent = unpack(packet)
        header_len = 20 + ((offset >> 4) << 2)
        size = length - header_len
        if (
            proto != 6
            or frag & 0x3FFF  # MF or a fragment offset
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
        flow = flows.get(key)  # key: addresses and ports
        if (
            flow is not None
            and seq == flow.next_seq
            and size <= flow.gso_size
            and flow.count < MAX_SEGMENTS
            and signature == flow.signature
        ):
            if flow.count == 1:
                merged.append(flow)
            flow.parts.append(memoryview(packet)[header_len:])
            flow.count += 1
            if size < flow.gso_size or flags & _PSH:  # the last one this write can take
                flow.psh = flags & _PSH
                flow.next_seq = -1
            else:
                flow.next_seq = (seq + size) & 0xFFFFFFFF
            continue
        flow = _Flow([PLAIN_HEADER, packet], header_len, size, (seq + size) & 0xFFFFFFFF, signature)
        if flags & _PSH:
            flow.psh = _PSH
            flow.next_seq = -1
        flows[key] = flow
        writes.append(flow)
    for flow in merged:
        _finish(flow)
    return [(w.parts, w.count) if type(w) is _Flow else w for w in writes]


def _finish(flow: _Flow) -> None:
    """Turn [PLAIN_HEADER, first packet, payloads...] into one GSO write."""
    parts = flow.parts
    first = parts[1]
    header_len = flow.header_len
    total = header_len + flow.gso_size + sum(len(p) for p in parts[2:])
    head = bytearray(first[:header_len])
    head[2:4] = total.to_bytes(2, "big")
    head[10:12] = b"\0\0"
    head[10:12] = (~_fold(sum(_IP_WORDS.unpack_from(head))) & 0xFFFF).to_bytes(2, "big")
    head[33] = (head[33] & ~_PSH) | flow.psh  # PSH as the last segment had it
    tcp_len = total - 20
    pseudo = (
        (head[12] << 8 | head[13])
        + (head[14] << 8 | head[15])
        + (head[16] << 8 | head[17])
        + (head[18] << 8 | head[19])
        + 6
        + tcp_len
    )
    head[36:38] = _fold(pseudo).to_bytes(2, "big")
    vnet = _VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, header_len, flow.gso_size, 20, TCP_CSUM_OFFSET)
    parts[:2] = [vnet, head, memoryview(first)[header_len:]]


def _fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value
