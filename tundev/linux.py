"""Linux TUN backend: /dev/net/tun in IFF_TUN | IFF_NO_PI mode, non-blocking."""

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READ_SIZE = 65536


class LinuxTun:
    def __init__(self, name: str) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"TUN name {name!r} must be 1-{IFNAMSIZ - 1} bytes")
        self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            request = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
            reply = fcntl.ioctl(self._fd, TUNSETIFF, request)
        except OSError:
            os.close(self._fd)
            raise
        self.name = reply[:IFNAMSIZ].rstrip(b"\0").decode()

    def fileno(self) -> int:
        return self._fd

    def read_packets(self, limit: int) -> list[bytes]:
        packets = []
        for _ in range(limit):
            try:
                packets.append(os.read(self._fd, READ_SIZE))
            except BlockingIOError:
                break
        return packets

    def write_packet(self, packet: bytes) -> bool:
        """False if the kernel can't take it now (EAGAIN); other errors raise OSError
        (EIO while the device is down, EINVAL for a packet the kernel refuses)."""
        try:
            os.write(self._fd, packet)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
