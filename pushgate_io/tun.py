"""The TUN interface the client and the dataplane run on.

As wireguard-go's tun.Device: one interface, one implementation per OS
(`pushgate_io.tun_linux.LinuxTun`, `client.wintun.WintunTun`) and one in memory
(`pushgate_io.memory.MemoryTun`). Nothing that uses a TUN knows which one it has.
Backends deliver plain IP packets, one per item.
"""

from typing import Protocol

# Packets the kernel queues on a Linux TUN for its reader (Linux default 500).
# The reader drains the queue as fast as its CPU allows, so it only fills while
# the reader waits to be scheduled; then a short queue drops packets (TCP
# retransmits, measured in docs/performance.md). Where the network is the
# bottleneck the queue stays empty, so a longer one adds no latency there.
TUN_QUEUE_PACKETS = 2000


class TunDevice(Protocol):
    name: str
    # Reads give TCP packets in the partial checksum form (pushgate_io/tso.py):
    # the dataplane's Linux TUN with TSO reads; False everywhere else.
    partial_tcp: bool

    def fileno(self) -> int:
        """A descriptor that becomes readable when packets are waiting, and
        writable when a write that returned False may succeed."""

    def read_packets(self, limit: int) -> list[bytes]:
        """Up to `limit` waiting IP packets; an empty list when none wait."""

    def read_queues(self) -> list:
        """What a loop reads: objects with `fileno()` and `read_packets(limit)`, each
        readable on its own. The device itself for most backends; one per queue of
        a multi-queue Linux TUN (the dataplane's)."""

    def coalesce(self, packets: list[bytes], partial_tcp: bool = False) -> list[tuple[list, int]]:
        """The writes that carry IP `packets`, in order: (buffers, packets carried)
        each. A backend that can merges segments of a flow into one write.
        `partial_tcp`: TCP packets carry partial checksums (pushgate_io/tso.py), which
        the kernel completes, or the backend does."""

    def write_buffers(self, buffers: list) -> bool:
        """Hand one write of `coalesce` to the OS; False if it cannot take it now,
        OSError if it refuses it."""

    def close(self) -> None: ...
