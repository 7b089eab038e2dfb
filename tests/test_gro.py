"""TUN receive offload (pushgate_io/gro.py): what is merged, and that merging is exact."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pushgate_io.gro import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_UDP_L4,
    MAX_SEGMENTS,
    PLAIN_HEADER,
    UDP_MAX_SEGMENTS,
    coalesce,
)

SRC, DST = bytes([198, 18, 0, 2]), bytes([198, 19, 0, 1])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp(seq, payload, *, sport=40000, flags=0x10, ack=7, ttl=64, ip_id=1, src=SRC, options=b""):
    tcp_header = (
        struct.pack(
            "!HHIIBBHHH", sport, 5201, seq, ack, (5 + len(options) // 4) << 4, flags, 512, 0, 0
        )
        + options
    )
    total = 20 + len(tcp_header) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, 0x4000, ttl, 6, 0, src, DST)
    ip = ip[:10] + (~_checksum(ip) & 0xFFFF).to_bytes(2, "big") + ip[12:]
    pseudo = src + DST + struct.pack("!BBH", 0, 6, len(tcp_header) + len(payload))
    csum = ~_checksum(pseudo + tcp_header + payload) & 0xFFFF
    return ip + tcp_header[:16] + csum.to_bytes(2, "big") + tcp_header[18:] + payload


def _segments(writes):
    """Undo each write as the kernel's GSO would: (header, payload) per segment."""
    out = []
    for parts, count in writes:
        vnet, data = bytes(parts[0]), b"".join(bytes(p) for p in parts[1:])
        if vnet == PLAIN_HEADER:
            assert count == 1
            out.append(data)
            continue
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("=BBHHHH", vnet)
        assert int.from_bytes(data[2:4], "big") == len(data)
        assert _checksum(data[:20]) == 0xFFFF  # the IPv4 header checksum is valid
        if gso_type == GSO_UDP_L4:
            out.extend(
                _udp_segments(data, flags, hdr_len, gso_size, csum_start, csum_offset, count)
            )
            continue
        assert (flags, gso_type, csum_start, csum_offset) == (F_NEEDS_CSUM, GSO_TCPV4, 20, 16)
        pseudo = data[12:20] + struct.pack("!BBH", 0, 6, len(data) - 20)
        assert int.from_bytes(data[36:38], "big") == _checksum(pseudo)  # partial, for the kernel
        payload = data[hdr_len:]
        pieces = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
        assert len(pieces) == count and all(len(p) == gso_size for p in pieces[:-1])
        seq = int.from_bytes(data[24:28], "big")
        for piece in pieces:
            out.append((data[12:24], seq, piece))
            seq = (seq + len(piece)) & 0xFFFFFFFF
    return out


def _udp_segments(data, flags, hdr_len, gso_size, csum_start, csum_offset, count):
    """The datagrams the kernel cuts a UDP GSO write into: (addresses and ports, payload)."""
    assert (flags, hdr_len, csum_start, csum_offset) == (F_NEEDS_CSUM, 28, 20, 6)
    assert int.from_bytes(data[24:26], "big") == len(data) - 20  # UDP length of the whole
    pseudo = data[12:20] + struct.pack("!BBH", 0, 17, len(data) - 20)
    assert int.from_bytes(data[26:28], "big") == _checksum(pseudo)  # partial, for the kernel
    payload = data[28:]
    pieces = [payload[i : i + gso_size] for i in range(0, len(payload), gso_size)]
    assert len(pieces) == count <= UDP_MAX_SEGMENTS
    assert all(len(p) == gso_size for p in pieces[:-1])
    return [(data[12:24], piece) for piece in pieces]


def udp(payload, *, sport=4000, ttl=64, src=SRC):
    total = 28 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, ttl, 17, 0, src, DST)
    ip = ip[:10] + (~_checksum(ip) & 0xFFFF).to_bytes(2, "big") + ip[12:]
    return ip + struct.pack("!HHHH", sport, 9000, 8 + len(payload), 0x1234) + payload


def _plain_udp(packet):
    return (packet[12:24], packet[28:])


def test_udp_datagrams_of_a_flow_become_one_write_and_come_back_the_same():
    packets = [udp(bytes([i]) * 64) for i in range(20)] + [udp(b"tail")]
    writes = coalesce(packets)
    assert [count for _, count in writes] == [21]
    assert _segments(writes) == [_plain_udp(p) for p in packets]


def test_udp_merging_stops_where_the_kernel_would_split_differently():
    packets = [
        udp(b"a" * 64),
        udp(b"b" * 64),
        udp(b"c" * 32),  # shorter: the last of the first write
        udp(b"d" * 64),  # nothing after a shorter one
        udp(b"e" * 64, ttl=3),  # another TTL: not with d
        udp(b"f" * 64, sport=4001),  # another flow
        udp(b"g" * 80, sport=4001),  # larger than the first of its flow
    ]
    writes = coalesce(packets)
    assert [count for _, count in writes] == [3, 1, 1, 1, 1]
    assert _segments(writes) == [_plain_udp(p) for p in packets[:3]] + packets[3:]


def test_udp_writes_respect_the_kernel_limits():
    writes = coalesce([udp(b"x" * 64) for _ in range(UDP_MAX_SEGMENTS + 3)])
    assert [n for _, n in writes] == [UDP_MAX_SEGMENTS, 3]
    writes = coalesce([udp(b"x" * 1400) for _ in range(60)])
    assert [n for _, n in writes] == [46, 14]  # 46 x 1400 + 28 <= 65535


def test_without_uso_udp_datagrams_go_one_by_one():
    packets = [udp(b"x" * 64) for _ in range(5)]
    writes = coalesce(packets, udp=False)
    assert [n for _, n in writes] == [1] * 5
    assert [b"".join(bytes(p) for p in parts[1:]) for parts, _ in writes] == packets


def _plain(packet):
    return (packet[12:24], int.from_bytes(packet[24:28], "big"), packet[40:])


def test_a_bulk_stream_becomes_one_write_and_keeps_every_byte():
    packets = [tcp(1000 + 1400 * i, bytes([i]) * 1400) for i in range(10)]
    packets.append(tcp(1000 + 14000, b"tail", flags=0x18))  # shorter, with PSH: last
    writes = coalesce(packets)
    assert [count for _, count in writes] == [11]
    assert writes[0][0][1][33] == 0x18  # the merged header carries the last PSH
    assert _segments(writes) == [_plain(p) for p in packets]


def test_what_must_not_merge_is_written_alone_in_order():
    syn = tcp(1, b"", flags=0x02)
    pure_ack = tcp(5, b"")
    udp = bytearray(tcp(9, b"x" * 100))
    udp[9] = 17
    packets = [
        syn,
        pure_ack,
        bytes(udp),
        tcp(100, b"a" * 100),
        tcp(300, b"b" * 100),  # a gap in sequence numbers
        tcp(400, b"c" * 100, ttl=3),  # another TTL
        tcp(500, b"d" * 100, ack=8),  # another ACK number
        tcp(600, b"e" * 100, flags=0x11),  # FIN
    ]
    writes = coalesce(packets)
    assert [count for _, count in writes] == [1] * len(packets)
    assert [b"".join(bytes(p) for p in parts[1:]) for parts, _ in writes] == packets


def test_nothing_follows_a_shorter_segment_or_a_push():
    packets = [tcp(0, b"a" * 100), tcp(100, b"b" * 50), tcp(150, b"c" * 50)]
    assert [n for _, n in coalesce(packets)] == [2, 1]
    packets = [tcp(0, b"a" * 100, flags=0x18), tcp(100, b"b" * 100)]
    assert [n for _, n in coalesce(packets)] == [1, 1]
    packets = [tcp(0, b"a" * 50), tcp(50, b"b" * 100)]  # larger after smaller
    assert [n for _, n in coalesce(packets)] == [1, 1]


def test_a_write_carries_at_most_max_segments():
    packets = [tcp(1400 * i, b"x" * 1400) for i in range(MAX_SEGMENTS + 5)]
    writes = coalesce(packets)
    assert [n for _, n in writes] == [MAX_SEGMENTS, 5]
    assert sum(len(b"".join(bytes(p) for p in parts[1:])) for parts, _ in writes) < 2 * 65535


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([40000, 40001]), st.integers(1, 1400), st.booleans(), st.booleans()
        ),
        max_size=40,
    )
)
def test_interleaved_flows_lose_nothing_and_keep_their_order(steps):
    next_seq = {40000: 0, 40001: 0}
    packets = []
    for sport, size, gap, push in steps:
        seq = next_seq[sport] + (size if gap else 0)
        packets.append(
            tcp(seq, bytes([size % 256]) * size, sport=sport, flags=0x18 if push else 0x10)
        )
        next_seq[sport] = seq + size
    writes = coalesce(packets)
    assert sum(n for _, n in writes) == len(packets)
    got = [s if isinstance(s, tuple) else _plain(s) for s in _segments(writes)]
    for sport in (40000, 40001):
        port = sport.to_bytes(2, "big")
        assert [g for g in got if g[0][8:10] == port] == [
            _plain(p) for p in packets if p[20:22] == port
        ]
