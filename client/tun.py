"""The TUN backend interface the client core runs on.

As wireguard-go's tun.Device: one interface, one implementation per OS
(`tundev.linux.LinuxTun`, `client.wintun.WintunTun`), chosen by the host
(`client.host.current_host`). The client core never knows which one it has.
Backends deliver plain IP packets, one per item.
"""

from typing import Protocol


class TunDevice(Protocol):
    name: str

    def fileno(self) -> int:
        """A descriptor that becomes readable when packets are waiting."""

    def read_packets(self, limit: int) -> list[bytes]:
        """Up to `limit` waiting IP packets; an empty list when none wait."""

    def coalesce(self, packets: list[bytes]) -> list[tuple[list, int]]:
        """The writes that carry IP `packets`, in order: (buffers, packets carried)
        each. A backend that can merges segments of a flow into one write."""

    def write_buffers(self, buffers: list) -> bool:
        """Hand one write of `coalesce` to the OS; False if it cannot take it now,
        OSError if it refuses it."""

    def close(self) -> None: ...
