"""TUN reads with TSO (pushgate_io/tso.py): segments that a receiver's stack
takes, and the partial checksum form, against a plain reference checksum."""

import ipaddress
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from test_gro import _checksum as reference_sum  # RFC 1071 the slow way

from pushgate_io import gro, tso


def pseudo_header(packet: bytes, offset: int) -> bytes:
    length = len(packet) - offset
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, 6, length)
    return packet[8:40] + struct.pack("!IxxxB", length, 6)


def tcp_checksum_ok(packet: bytes, offset: int) -> bool:
    return reference_sum(pseudo_header(packet, offset) + packet[offset:]) == 0xFFFF


def with_reference_checksum(packet: bytes, offset: int) -> bytes:
    out = bytearray(packet)
    out[offset + 16 : offset + 18] = b"\0\0"
    value = 0xFFFF - reference_sum(pseudo_header(bytes(out), offset) + bytes(out[offset:]))
    out[offset + 16 : offset + 18] = value.to_bytes(2, "big")
    return bytes(out)


def ipv4_tcp(payload: bytes, *, seq=1, flags=0x10, tcp_options=b"", ip_id=7, src="198.18.2.2",
             dst="198.19.0.2") -> bytes:  # fmt: skip
    tcp_len = 20 + len(tcp_options)
    total = 20 + tcp_len + len(payload)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            ip_id,
            0x4000,
            64,
            6,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
    )
    ip[10:12] = (0xFFFF - reference_sum(bytes(ip))).to_bytes(2, "big")
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 99, (tcp_len // 4) << 4, flags, 500, 0, 0)
    return with_reference_checksum(bytes(ip) + tcp + tcp_options + payload, 20)


def ipv6_tcp(payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, 5, 6, 5 << 4, 0x18, 500, 0, 0)
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(tcp) + len(payload),
        6,
        64,
        ipaddress.IPv6Address("2001:db8::1").packed,
        ipaddress.IPv6Address("2001:db8::2").packed,
    )
    return with_reference_checksum(header + tcp + payload, 40)


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 65535 - 80),
    st.integers(200, 1460),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
    st.sampled_from([0x10, 0x18, 0x19, 0x90, 0x98]),  # ACK, +PSH, +FIN, CWR+ACK, CWR+PSH
    st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),  # none, or timestamps
)
def test_a_super_packet_is_cut_into_segments_a_stack_takes(
    length, gso_size, seq, ip_id, flags, tcp_options
):
    payload = random.Random(length).randbytes(length)
    whole = ipv4_tcp(payload, seq=seq, flags=flags, tcp_options=tcp_options, ip_id=ip_id)
    header_len = 40 + len(tcp_options)
    read = vnet(tso.F_NEEDS_CSUM, tso.GSO_TCPV4, header_len, gso_size, 20, 16) + whole
    segments = tso.packets(read)
    assert len(segments) == -(-len(payload) // gso_size)
    assert b"".join(s[header_len:] for s in segments) == payload
    for index, segment in enumerate(segments):
        assert len(segment) <= header_len + gso_size
        assert int.from_bytes(segment[2:4], "big") == len(segment)
        assert int.from_bytes(segment[4:6], "big") == (ip_id + index) & 0xFFFF
        assert reference_sum(segment[:20]) == 0xFFFF  # the IP header checksum holds
        assert segment[20:24] == whole[20:24] and segment[28:32] == whole[28:32]  # ports, ack
        assert int.from_bytes(segment[24:28], "big") == (seq + index * gso_size) % 2**32
        last, first = index == len(segments) - 1, index == 0
        expected = flags if last else flags & ~0x09
        assert segment[33] == (expected if first else expected & ~0x80)
        assert segment[40:header_len] == tcp_options
        # the partial form: completing it gives the checksum a stack checks
        assert tso.complete(segment) == with_reference_checksum(segment, 20)
        assert tcp_checksum_ok(tso.complete(segment), 20)
        # ... and it holds the pseudo-header sum, as a kernel completing it expects
        assert int.from_bytes(segment[36:38], "big") == reference_sum(pseudo_header(segment, 20))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.booleans())
def test_complete_packets_go_into_the_form_and_back(payload, v6):
    packet = ipv6_tcp(payload) if v6 else ipv4_tcp(payload)
    offset = 40 if v6 else 20
    assert tcp_checksum_ok(packet, offset)
    (partial,) = tso.packets(vnet() + packet)  # a complete one, as a forwarded packet comes
    assert partial == tso.to_partial(packet)
    assert partial[: offset + 16] == packet[: offset + 16]
    assert partial[offset + 18 :] == packet[offset + 18 :]
    assert tso.complete(partial) == packet


def test_a_partial_tcp_packet_is_kept_and_a_partial_udp_one_completed():
    partial = tso.to_partial(ipv4_tcp(b"hello"))
    assert tso.packets(vnet(tso.F_NEEDS_CSUM, 0, 0, 0, 20, 16) + partial) == [partial]
    # UDP from the gateway host, its checksum field holding the pseudo-header sum
    payload = b"an answer"
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28 + len(payload),
        1,
        0x4000,
        64,
        17,
        0,
        bytes([198, 18, 0, 1]),
        bytes([198, 19, 0, 2]),
    )
    udp_len = 8 + len(payload)
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 53, 4000, udp_len, reference_sum(pseudo)) + payload
    (done,) = tso.packets(vnet(tso.F_NEEDS_CSUM, 0, 0, 0, 20, 6) + ip + udp)
    assert reference_sum(pseudo + done[20:]) == 0xFFFF


def test_what_the_form_does_not_cover_is_left_alone():
    icmp = bytes.fromhex("4500001c0001400040010000c6120001c6130002") + bytes(8)
    fragment = bytearray(ipv4_tcp(b"x" * 100))
    fragment[6] |= 0x20  # more fragments
    for packet in (icmp, bytes(fragment)):
        assert tso.tcp_offset(packet) == 0
        assert tso.packets(vnet() + packet) == [packet]
        assert tso.complete(packet) is packet and tso.to_partial(packet) is packet
    # too short for an IPv4 header: nothing to look at, and nothing raised
    for short in (b"", b"\x45", bytes.fromhex("4500001c00010000") + bytes(11)):
        assert tso.tcp_offset(short) == 0
        assert tso.complete(short) is short
    # a read that cannot be cut stands as an empty packet, which the router drops
    assert tso.packets(b"short") == [b""]
    assert tso.packets(vnet(0, 4) + ipv6_tcp(b"x")) == [b""]  # TCPv6 GSO: never asked for


def test_the_client_has_the_kernel_complete_lone_tcp_packets_of_the_form():
    """What the client writes to its TUN (pushgate_io/gro.py): with partial TCP
    checksums, a TCP packet written alone is marked NEEDS_CSUM at its TCP header
    (merged ones always are); anything else goes as it is."""
    lone_v4 = tso.to_partial(ipv4_tcp(b"fin", flags=0x11))  # FIN: never merged
    lone_v6 = tso.to_partial(ipv6_tcp(b"over IPv6"))
    icmp = bytes.fromhex("4500001c0001400040010000c6120001c6130002") + bytes(8)
    writes = gro.coalesce([lone_v4, lone_v6, icmp], partial_tcp=True)
    assert [buffers[1:] for buffers, _ in writes] == [[lone_v4], [lone_v6], [icmp]]
    headers = [buffers[0] for buffers, _ in writes]
    assert headers == [vnet(1, 0, 0, 0, 20, 16), vnet(1, 0, 0, 0, 40, 16), bytes(10)]
    plain = gro.coalesce([lone_v4, lone_v6, icmp])
    assert [buffers[0] for buffers, _ in plain] == [bytes(10)] * 3
