"""MSS clamping on the dataplane's path: a TCP SYN through the tunnel asks for
no larger segments than the tunnel MTU carries (the rewrite itself is
inner.clamp_mss).

Called for every packet, so the common case is decided first from three bytes:
an IPv4 packet without options that is not a TCP SYN is returned as it is.
"""

from . import inner

MSS_OVERHEAD = {4: 40, 6: 60}  # IP + TCP headers without options


class MssClamp:
    """Clamps to one MTU and counts the SYNs it lowered in `counters.mss_clamped`."""

    __slots__ = ("counters", "mtu")

    def __init__(self, mtu: int, counters) -> None:
        self.mtu = mtu
        self.counters = counters

    def clamp(self, packet: bytes, partial: bool = False) -> bytes:
        """`packet`, or a copy whose MSS option is lowered (and checksum fixed, unless
        `partial`: TCP packets in the partial form of pushgate_io/tso.py)."""
        if packet[0] == 0x45 and (packet[9] != 6 or len(packet) < 40 or not packet[33] & 0x02):
            return packet  # IPv4 without options, and not a TCP SYN: nothing to clamp
        max_mss = self.mtu - MSS_OVERHEAD.get(packet[0] >> 4, 40)
        clamped = inner.clamp_mss(packet, max_mss, partial)
        if clamped is not packet:
            self.counters.mss_clamped += 1
        return clamped

    def clamp_partial(self, packet: bytes) -> bytes:
        """`clamp` for TCP packets in the partial checksum form."""
        return self.clamp(packet, True)
