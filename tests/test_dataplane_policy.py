"""The dataplane's small pure policies, apart from its I/O: stall detection
(dataplane/stall.py) and the MSS clamp's fast path (dataplane/mss.py); the
rate-limited log has its own tests (test_rate_limited_log.py)."""

import struct

import pytest

from dataplane.metrics import Counters
from dataplane.mss import MssClamp
from dataplane.stall import OneWay, one_way
from netlab.packets import ipv4, ipv4_tcp_syn, ipv4_udp

INSTALLED, KEEPALIVE = 100.0, 10.0


@pytest.mark.parametrize(
    ("received", "sent", "now", "expected"),
    [
        (None, None, 1000.0, None),  # nothing carried yet
        (150.0, 150.0, 1000.0, None),  # both ways, long quiet
        (150.0, 131.0, 1000.0, None),  # 19 s apart: within two keepalives
        (150.0, 129.0, 1000.0, OneWay("receives but sends nothing", 21.0)),
        (129.0, 150.0, 1000.0, OneWay("sends but receives nothing", 21.0)),
        (150.0, 129.0, 149.0, None),  # the older side is not yet 20 s old
        (150.0, None, 1000.0, OneWay("receives but sends nothing", 50.0)),  # from install
        (None, 115.0, 1000.0, None),  # 15 s after the install
    ],
)
def test_a_session_is_stalled_when_one_direction_went_quiet_for_two_keepalives(
    received, sent, now, expected
):
    assert one_way(received, sent, INSTALLED, KEEPALIVE, now) == expected


def test_the_mss_clamp_passes_what_it_need_not_touch_as_the_same_object():
    counters = Counters()
    clamp = MssClamp(1420, counters).clamp
    udp = ipv4_udp("198.19.0.2", "198.18.2.2", 1, 2, b"x" * 40)
    small_syn = ipv4_tcp_syn("198.19.0.2", "198.18.2.2", 40000, 80, mss=1200)
    ack = bytearray(ipv4_tcp_syn("198.19.0.2", "198.18.2.2", 40000, 80, mss=1460))
    ack[33] = 0x10
    for packet in (udp, small_syn, bytes(ack)):
        assert clamp(packet) is packet
    assert counters.mss_clamped == 0


@pytest.mark.parametrize(("mtu", "expected"), [(1420, 1380), (1280, 1240)])
def test_the_mss_clamp_lowers_a_syn_to_what_the_mtu_carries_and_counts_it(mtu, expected):
    counters = Counters()
    clamp = MssClamp(mtu, counters).clamp
    clamped = clamp(ipv4_tcp_syn("198.19.0.2", "198.18.2.2", 40000, 80, mss=1460))
    assert struct.unpack_from("!H", clamped, 42)[0] == expected
    assert counters.mss_clamped == 1


def test_the_mss_clamp_looks_past_the_fast_path_at_other_packets():
    """An IPv4 packet with options is not read by the three-byte test; the slow
    path leaves a non-TCP one as it is."""
    counters = Counters()
    with_options = bytearray(ipv4("198.19.0.2", "198.18.2.2", 17, bytes(12)))
    with_options[0] = 0x46
    packet = bytes(with_options) + bytes(4)
    assert MssClamp(1420, counters).clamp(packet) is packet
    assert counters.mss_clamped == 0
