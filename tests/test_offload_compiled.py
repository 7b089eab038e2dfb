"""The compiled TUN offloads (pushgate_io/_offload.c) against the reference
(gro.py's and tso.py's python_ functions).

The write merge: the same writes (virtio-net header, bytes written, packets
carried) for any batch: streams of several TCP and UDP flows with gaps, pushes,
odd flags, changed TTL, window or options, fragments, IPv6, lone TCP packets in
the partial checksum form, truncated packets and noise. The read cut and the
checksum forms: the same bytes for any super-packet, and for any packet, TCP or
not. `make test` builds it, so on Linux its absence is a failure, not a skip."""

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushgate_io import gro, tso

if not tso.COMPILED and not sys.platform.startswith("linux"):
    pytest.skip("the compiled offloads are built on Linux only", allow_module_level=True)

from test_gro import tcp, udp
from test_tso import ipv4_tcp, vnet
from test_tso import ipv6_tcp as tso_ipv6_tcp

from pushgate_io import _offload as compiled

compiled_coalesce = compiled.coalesce


def any_packets(tcp_payload: int):
    """TCP over IPv4 (payloads up to `tcp_payload` bytes) and IPv6, UDP, and noise."""
    return st.one_of(
        st.builds(ipv4_tcp, st.binary(max_size=tcp_payload)),
        st.builds(tso_ipv6_tcp, st.binary(max_size=2000)),
        st.builds(udp, st.binary(min_size=1, max_size=200)),
        st.binary(max_size=120),
    )


SPORTS = [40000, 40001, 40002]


def ipv6_tcp(payload: bytes) -> bytes:
    tcp_header = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 7, 5 << 4, 0x10, 512, 0, 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + len(payload), 6, 64, bytes(16), bytes(16))
    return ip + tcp_header + payload


@st.composite
def batches(draw):
    """A batch as a dataplane's TUN write sees it, with every way a packet can
    fail to join drawn often enough to be seen."""
    next_seq = dict.fromkeys(SPORTS, 1000)
    packets = []
    for _ in range(draw(st.integers(0, 120))):
        kind = draw(st.sampled_from(["tcp"] * 6 + ["udp"] * 3 + ["odd"]))
        sport = draw(st.sampled_from(SPORTS))
        size = draw(st.sampled_from([1, 64, 500, 1368, 1368, 1368, 1400, 1460]))
        payload = bytes([size % 251]) * size
        if kind == "tcp":
            seq = (next_seq[sport] + draw(st.sampled_from([0, 0, 0, 0, size, -size]))) % 2**32
            flags = draw(st.sampled_from([0x10] * 8 + [0x18, 0x11, 0x12, 0x04, 0x50]))
            ttl = draw(st.sampled_from([64] * 9 + [63]))
            options = draw(st.sampled_from([b""] * 4 + [b"\x01\x01\x08\x0a" + bytes(8)]))
            packets.append(tcp(seq, payload, sport=sport, flags=flags, ttl=ttl, options=options))
            next_seq[sport] = (seq + size) & 0xFFFFFFFF
        elif kind == "udp":
            ttl = draw(st.sampled_from([64] * 9 + [63]))
            packets.append(udp(payload, sport=sport, ttl=ttl))
        else:
            base = tcp(next_seq[sport], payload, sport=sport)
            odd = draw(
                st.sampled_from(
                    [
                        base[:6] + b"\x20\x00" + base[8:],  # a fragment (MF)
                        base[: draw(st.integers(0, len(base) - 1))],  # truncated
                        ipv6_tcp(payload),
                        bytes([0x46]) + base[1:],  # IPv4 with options
                        base[:9] + b"\x01" + base[10:],  # ICMP
                        draw(st.binary(max_size=80)),  # noise
                    ]
                )
            )
            packets.append(odd)
    return packets


def writes(result):
    return [
        (bytes(parts[0]), b"".join(bytes(part) for part in parts[1:]), n) for parts, n in result
    ]


@given(batches(), st.booleans(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_compiled_merge_gives_the_reference_writes(packets, udp_offload, partial_tcp):
    expected = gro.python_coalesce(packets, udp=udp_offload, partial_tcp=partial_tcp)
    assert writes(compiled_coalesce(packets, udp_offload, partial_tcp)) == writes(expected)


def test_the_offloads_are_the_compiled_ones_unless_pure_python_is_asked_for():
    assert tso.COMPILED
    assert (tso.packets, tso.complete, tso.to_partial) == (
        compiled.packets,
        compiled.complete,
        compiled.to_partial,
    )
    packets = [tcp(1000 + 100 * i, bytes(100)) for i in range(3)]
    [(parts, count)] = gro.coalesce(packets)
    assert count == 3 and len(parts) == 2  # the compiled one's shape: header, packet


def test_a_long_stream_is_cut_where_the_reference_cuts_it():
    """MAX_SEGMENTS and 64 KiB per write, for TCP and UDP, as in test_gro.py."""
    streams = [
        [tcp(1 + 1368 * i, bytes(1368)) for i in range(gro.MAX_SEGMENTS * 2 + 5)],
        [udp(bytes(64)) for _ in range(gro.UDP_MAX_SEGMENTS + 3)],
        [udp(bytes(1400)) for _ in range(60)],
    ]
    for packets in streams:
        expected = writes(gro.python_coalesce(packets))
        assert writes(compiled_coalesce(packets, True, False)) == expected
        assert len(expected) > 1


@given(
    st.integers(0, 20000),
    st.integers(-1, 1500),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
    st.sampled_from([0x10, 0x18, 0x19, 0x90, 0x98, 0x02]),
    st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
    st.sampled_from(["whole", "ip options", "fragment", "ipv6", "truncated"]),
)
@settings(max_examples=300, deadline=None)
def test_the_compiled_cut_gives_the_reference_segments(
    length, gso_size, seq, ip_id, flags, tcp_options, shape
):
    packet = ipv4_tcp(bytes([length % 251]) * length, seq=seq, flags=flags,
                      tcp_options=tcp_options, ip_id=ip_id)  # fmt: skip
    if shape == "ip options":  # IHL 6: a 4-byte option (no-ops) after the header
        packet = bytes([0x46]) + packet[1:20] + b"\x01" * 4 + packet[20:]
    elif shape == "fragment":
        packet = packet[:6] + b"\x20\x00" + packet[8:]
    elif shape == "ipv6":
        packet = tso_ipv6_tcp(packet[40:])
    elif shape == "truncated":
        packet = packet[: length % len(packet)]
    expected = tso.python_segments(packet, gso_size)
    assert compiled.segments(packet, gso_size) == expected
    assert compiled.segments(memoryview(packet), gso_size) == expected


@given(
    any_packets(2000),
    st.integers(0, 0xFFFF),
)
@settings(max_examples=300, deadline=None)
def test_the_compiled_checksum_forms_give_the_reference_bytes(packet, field):
    for candidate in (packet, _with_tcp_checksum_field(packet, field)):
        assert compiled.complete(candidate) == tso.python_complete(candidate)
        assert compiled.to_partial(candidate) == tso.python_to_partial(candidate)
    other = bytes(packet)
    if not tso.tcp_offset(other):  # what the form does not cover comes back itself
        assert compiled.complete(other) is other and compiled.to_partial(other) is other


def _with_tcp_checksum_field(packet: bytes, value: int) -> bytes:
    """`packet` with any value in its TCP checksum field (a partial or a wrong one)."""
    offset = tso.tcp_offset(packet)
    if not offset:
        return packet
    return packet[: offset + 16] + value.to_bytes(2, "big") + packet[offset + 18 :]


@given(
    any_packets(6000),
    st.sampled_from([0, 1]),  # NEEDS_CSUM or not
    st.sampled_from([0, 1, 0x81, 3, 4]),  # none, TCPv4, TCPv4 with ECN, UDP, TCPv6
    st.integers(0, 1500),
    st.sampled_from([(20, 16), (20, 6), (40, 16), (0, 0), (2000, 6)]),
)
@settings(max_examples=400, deadline=None)
def test_the_compiled_read_gives_the_reference_packets(packet, flags, gso_type, size, csum):
    """Any read: a TSO super-packet, a partial TCP or UDP packet (the UDP one
    completed where the kernel says), a complete one, odd GSO types and checksum
    places, a read too short for its header."""
    read = vnet(flags, gso_type, 0, size, *csum) + packet
    for data in (read, read[: len(read) // 3]):
        assert compiled.packets(data) == tso.python_packets(data)
