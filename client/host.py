"""What the client needs from the operating system, behind one interface.

The connection manager and the CLI talk to a `ClientHost`: it opens the TUN
backend, configures and unconfigures the network for a session, and knows how
to check privileges, tell whether a client process lives and ask one to stop.
`LinuxHost` (client/linux_host.py) uses /dev/net/tun and `ip`/`resolvectl`;
`WindowsHost` (client/windows_host.py) uses WinTun and the IP Helper API. As
wireguard-go's tun.Device, nothing above this knows which one it runs on.
"""

import asyncio
import sys
from collections.abc import Callable
from typing import Protocol

from pushgate_io.tun import TunDevice

from .auth import ClientError, ClientSession

UndoSteps = list[list[str]]  # kept in the status file to clean up after a crash

# What `--allow-lan` keeps reachable beside the kill switch, on every platform (as
# Mullvad's "local network sharing"): private, link-local and local multicast ranges
# only, never a public prefix a hostile LAN might announce.
LAN_PREFIXES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "224.0.0.0/24",
    "239.255.255.250/32",  # SSDP
    "fe80::/10",
    "fc00::/7",
    "ff02::/16",
)


class NetworkChangeFailed(ClientError):
    """A live network change failed part-way; `undo` covers both networks' steps."""

    def __init__(self, message: str, undo: UndoSteps) -> None:
        super().__init__(message, retryable=False)
        self.undo = undo


class ClientHost(Protocol):
    status_dir: str
    # The event loop the datapath needs (it waits on descriptors with add_reader);
    # None for the platform default.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None

    def check_privileges(self) -> None:
        """Raise ClientError with a clear message when we may not configure the network."""

    def open_tun(self, name: str) -> TunDevice:
        """Bring up the tunnel device; ClientError if it cannot."""

    def configure(self, tun: TunDevice, info: ClientSession) -> UndoSteps:
        """Address, MTU, routes and DNS for the session; returns how to undo them.
        On failure it undoes what it did and raises ClientError."""

    def update_network(
        self, tun: TunDevice, old: ClientSession, new: ClientSession, undo: UndoSteps
    ) -> UndoSteps:
        """Move the live tunnel from `old`'s pushed network (routes, DNS, domains) to
        `new`'s without tearing it down; returns the undo steps that replace `undo`.
        On failure raises NetworkChangeFailed, which says what to undo then.
        (Optional: a host without it gets changes at its next connection.)"""

    def unconfigure(self, undo: UndoSteps) -> None:
        """Undo (best effort, logs what fails): at disconnect and after a crash."""

    def process_alive(self, pid: int) -> bool: ...

    def install_stop_handlers(self, loop: asyncio.AbstractEventLoop, connection) -> None:
        """Route the OS's stop (and rekey/rebind) requests to the connection."""

    def request_stop(self, pid: int) -> bool:
        """Ask the client process `pid` to disconnect; False if it had to be ended
        without its own clean-up (then the caller undoes its configuration)."""


def current_host() -> ClientHost:
    if sys.platform == "win32":
        from .windows_host import WindowsHost

        return WindowsHost()
    from .linux_host import LinuxHost

    return LinuxHost()
