"""Build inner IP packets for tests (IPv4/UDP, IPv4/TCP SYN) and read them back."""

import ipaddress
import struct

from dataplane.inner import checksum


def ipv4(
    src: str, dst: str, protocol: int, body: bytes, *, dont_fragment: bool = True, ttl: int = 64
) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        0,
        0x4000 if dont_fragment else 0,
        ttl,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + body


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, **kw) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!xBH", 17, len(udp))
    )
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    return ipv4(src, dst, 17, udp, **kw)


def ipv4_tcp_syn(src: str, dst: str, sport: int, dport: int, mss: int) -> bytes:
    options = struct.pack("!BBH", 2, 4, mss) + b"\x01\x01\x04\x02"  # MSS, NOP, NOP, SACK ok
    tcp = (
        struct.pack(
            "!HHIIBBHHH", sport, dport, 1, 0, (5 + len(options) // 4) << 4, 0x02, 65535, 0, 0
        )
        + options
    )
    pseudo = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!xBH", 6, len(tcp))
    )
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return ipv4(src, dst, 6, tcp)


def udp_payload(packet: bytes) -> tuple[str, int, int, bytes]:
    """(source, source port, destination port, payload) of an IPv4/UDP packet."""
    header_len = (packet[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", packet, header_len)
    return (str(ipaddress.IPv4Address(packet[12:16])), sport, dport, packet[header_len + 8 :])
