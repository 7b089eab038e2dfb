"""WinTun and the IP Helper API on a real Windows machine (as Administrator).

Skipped elsewhere; the Windows workflow runs it (GitHub's runners are
administrators). It creates a real adapter from the bundled official DLL,
applies a split-tunnel plan through the IP Helper API, checks what Windows then
reports, sends a datagram into the tunnel and reads it off the ring, and undoes
everything. It touches no route of the machine's own interfaces: the pushed
route is a test range (198.19.254.0/24) that does not cover the gateway address.
"""

import contextlib
import ctypes
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
DLL = ROOT / "build" / "wintun" / "amd64" / "wintun.dll"

pytestmark = pytest.mark.skipif(
    sys.platform != "win32" or not ctypes.windll.shell32.IsUserAnAdmin(),
    reason="needs Windows and Administrator rights",
)

NAME = "pgtest0"
TUNNEL_ADDRESS = "198.19.255.2/24"
PUSHED = "198.19.254.0/24"
TARGET = ("198.19.254.9", 9999)


def test_a_real_adapter_takes_a_plan_and_carries_a_datagram():
    from client.iphlpapi import IpHelper
    from client.windows_host import WindowsHost
    from client.wintun import WintunLibrary, WintunTun, adapter_guid

    library = WintunLibrary(str(DLL))
    library.route_logger()
    tun = WintunTun(library, NAME)
    host = WindowsHost()
    helper = IpHelper()
    host._helper = helper
    undo = None
    try:
        assert tun.luid
        assert helper.luid_to_guid(tun.luid) == str(adapter_guid(NAME))
        assert library.driver_version().startswith("0.14")
        session = SimpleNamespace(
            endpoint=("198.18.0.1", 51820),
            tunnel_address=TUNNEL_ADDRESS,
            mtu=1380,
            routes=[PUSHED],
            dns_servers=["198.19.255.53"],
        )
        undo = host.configure(tun, session)
        row = helper.interface_row(tun.luid)
        assert (row.NlMtu, row.Metric, row.UseAutomaticMetric) == (1380, 5, 0)

        # A datagram to the pushed range leaves through the adapter: read it off the ring.
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deadline = time.monotonic() + 20  # the new address may still be tentative (DAD)
        seen = []
        while time.monotonic() < deadline and not seen:
            with contextlib.suppress(OSError):  # no usable source address yet
                sender.sendto(b"pushgate", TARGET)
            time.sleep(0.2)
            seen = [
                p
                for p in tun.read_packets(64)
                if p[0] >> 4 == 4 and socket.inet_ntoa(p[16:20]) == TARGET[0]
            ]
        sender.close()
        assert seen, "no datagram reached the WinTun ring"
        assert socket.inet_ntoa(seen[0][12:16]) == TUNNEL_ADDRESS.split("/")[0]
        assert seen[0].endswith(b"pushgate")
        # The send direction: the ring takes an IPv4 packet for Windows.
        echo = bytes.fromhex("450000540000400040010000c613fe09c613ff02") + bytes(64)
        assert tun.write_packet(echo)
    finally:
        if undo is not None:
            host.unconfigure(undo)
        tun.close()
