"""Linux TUN backend: /dev/net/tun in IFF_TUN | IFF_NO_PI mode, non-blocking.

With `offload=True` the device is opened with IFF_VNET_HDR: every read and
write carries a 10-byte virtio-net header, which lets `write_buffers` hand the
kernel consecutive TCP segments (and UDP datagrams, where the kernel has USO)
of a flow as one GSO super-packet (pushgate_io/gro.py). Reads stay plain IP
packets (the TUN's offload flags stay off, so the kernel never sends us GSO
packets); `read_packets` strips the header and `coalesce` adds it, so a caller
sees the same packets either way.

With `tso_reads=True` as well (the dataplane; the Linux client where the compiled
offloads are built), the offload flags are set to
TUN_F_CSUM | TUN_F_TSO4: the kernel hands over a TCP flow's segments as one
super-packet per read, and `read_packets` cuts it (pushgate_io/tso.py). Its
TCP packets are then in the partial checksum form (`partial_tcp`).

With `queues > 1` (the dataplane) the device is multi-queue (IFF_MULTI_QUEUE):
each queue is a descriptor with a ring of its own, and the kernel picks the
ring of each packet it routes to the device (dataplane/tun_steering.py makes
that the destination address's). `read_queues` gives one reader per queue; the
first descriptor, `fileno`, also takes the writes.
"""

import fcntl
import os
import struct

from . import gro, tso

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
READ_SIZE = 65536 + gro.VNET_HDR_LEN  # a super-packet of 64 KiB and its header


class LinuxTun:
    def __init__(
        self, name: str, *, offload: bool = False, tso_reads: bool = False, queues: int = 1
    ) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"TUN name {name!r} must be 1-{IFNAMSIZ - 1} bytes")
        if queues < 1:
            raise ValueError(f"a TUN has at least one queue, not {queues}")
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        if queues > 1:
            flags |= IFF_MULTI_QUEUE
        self._fds: list[int] = []
        self.name = name  # a pattern ("pg%d") until the kernel names the device
        try:
            for _ in range(queues):  # the first creates the device, the others attach
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(fd)
                reply = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), flags))
                self.name = reply[:IFNAMSIZ].rstrip(b"\0").decode()
        except OSError:
            self.close()
            raise
        self._fd = self._fds[0]
        self.offload = offload
        self._skip = gro.VNET_HDR_LEN if offload else 0
        self.udp_offload = offload and _takes_udp_gso(self._fd)
        self.partial_tcp = offload and tso_reads and _reads_tso(self._fd)
        self._queues = [TunQueue(fd, self._skip, self.partial_tcp) for fd in self._fds]

    def fileno(self) -> int:
        return self._fd

    def read_packets(self, limit: int) -> list[bytes]:
        """About `limit` packets from the first queue (see TunQueue.read_packets)."""
        return self._queues[0].read_packets(limit)

    def read_queues(self) -> list["TunQueue"]:
        return list(self._queues)

    def coalesce(self, packets: list[bytes], partial_tcp: bool = False) -> list[tuple[list, int]]:
        """The writes that carry `packets`: (buffers, packet count) for `write_buffers`."""
        if self._skip:
            return gro.coalesce(packets, udp=self.udp_offload, partial_tcp=partial_tcp)
        if partial_tcp:
            packets = [tso.complete(packet) for packet in packets]
        return [([packet], 1) for packet in packets]

    def write_buffers(self, buffers: list) -> bool:
        """Write one item of `coalesce`. False if the kernel can't take it now
        (EAGAIN); other errors raise OSError (EIO while the device is down, EINVAL
        for a packet the kernel refuses)."""
        try:
            os.writev(self._fd, buffers)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        fds, self._fds, self._fd = self._fds, [], -1
        for fd in fds:
            os.close(fd)


class TunQueue:
    """One queue of a Linux TUN, as the loop reads it."""

    __slots__ = ("_fd", "_skip", "partial_tcp")

    def __init__(self, fd: int, skip: int, partial_tcp: bool) -> None:
        self._fd = fd
        self._skip = skip
        self.partial_tcp = partial_tcp

    def fileno(self) -> int:
        return self._fd

    def read_packets(self, limit: int) -> list[bytes]:
        """About `limit` packets: reads stop once that many are in (with TSO reads,
        one read may bring dozens, so a little more), or when none waits."""
        packets: list[bytes] = []
        skip = self._skip
        while len(packets) < limit:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                break
            if self.partial_tcp:
                packets += tso.packets(data)
            else:
                packets.append(data[skip:] if skip else data)
        return packets


def _takes_udp_gso(fd: int) -> bool:
    """Whether this kernel takes UDP GSO writes from a TUN (USO, Linux 6.2+): it
    accepts the USO offload flags only if it knows them. The flags are cleared
    again at once, so reads stay plain packets (they would allow GSO reads)."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
    except OSError:
        return False
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return True


def _reads_tso(fd: int) -> bool:
    """Whether the kernel takes TUN_F_CSUM | TUN_F_TSO4: then the TUN hands over
    TCP super-packets (and packets whose checksum is left partial) from now on."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    except OSError:
        return False
    return True
