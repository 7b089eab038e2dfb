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


# -- issue 20: WFP, NRPT and the private directory on a real machine ----------------
# None of these touches the runner's own traffic: the filter blocks one address of
# the benchmarking range, the NRPT rule covers a name under .invalid.

BLOCKED = ("198.18.254.9", 9)
WSAEACCES = 10013  # what a connect refused by a WFP filter at the ALE layer returns


def _connect_error(address) -> int | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(address)
    except OSError as error:
        return getattr(error, "winerror", None) or error.errno
    finally:
        probe.close()
    return None


def test_a_persistent_wfp_filter_blocks_a_connect_until_removed():
    from client import wfp

    firewall = wfp.WfpFirewall()
    spec = wfp.FilterSpec(
        "pushgate live test: block one benchmarking address",
        "connect_v4",
        "block",
        wfp.WEIGHT_ENDPOINT,
        (
            wfp.Condition("remote_address", BLOCKED[0]),
            wfp.Condition("protocol", wfp.IPPROTO_TCP),
            wfp.Condition("remote_port", BLOCKED[1]),
        ),
    )
    assert _connect_error(BLOCKED) != WSAEACCES  # a timeout or unreachable, not refused
    try:
        assert firewall.install(NAME, [spec]) == 1
        # The engine handle that added it is closed: a persistent filter stays.
        assert _connect_error(BLOCKED) == WSAEACCES
        assert wfp.WfpFirewall().install(NAME, [spec]) == 1  # replaced, not doubled
    finally:
        removed = wfp.WfpFirewall().remove(NAME)
    assert removed == 1
    assert _connect_error(BLOCKED) != WSAEACCES


def test_an_nrpt_rule_is_seen_by_the_dns_client_and_removed():
    import subprocess

    from client.nrpt import Nrpt, plan_nrpt

    rules = plan_nrpt(
        NAME, dns_servers=["198.18.254.53"], match_domains=["pushgate-test.invalid"],
        full_tunnel=False,
    )  # fmt: skip

    def policy() -> str:
        return subprocess.run(
            ["powershell", "-NoProfile", "-Command",
             "Get-DnsClientNrptPolicy | Format-List Namespace,NameServers"],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip

    nrpt = Nrpt()
    try:
        nrpt.apply(NAME, rules)
        deadline = time.monotonic() + 20
        while "pushgate-test.invalid" not in policy() and time.monotonic() < deadline:
            time.sleep(0.5)
        seen = policy()
        assert ".pushgate-test.invalid" in seen and "198.18.254.53" in seen
    finally:
        assert nrpt.remove(NAME) == 1
    deadline = time.monotonic() + 20
    while "pushgate-test.invalid" in policy() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "pushgate-test.invalid" not in policy()


def test_the_private_directory_has_our_dacl_and_a_junction_is_refused(tmp_path):
    import os
    import subprocess

    from client.winsecurity import (
        ADMINISTRATORS_SID,
        UnsafeDirectory,
        WinSecurity,
        ensure_private_directory,
    )

    security = WinSecurity()
    private = str(tmp_path / "pushgate")
    ensure_private_directory(private, security)
    assert security.state(private).owner_sid == ADMINISTRATORS_SID
    acl = subprocess.run(["icacls", private], capture_output=True, text=True).stdout
    entries = [line for line in acl.splitlines()[:-2] if ":" in line]
    assert all("SYSTEM" in line or "Administrators" in line for line in entries), acl
    assert "(I)" not in acl  # protected: nothing inherited from above
    ensure_private_directory(private, security)  # again: ours, fine

    junction = str(tmp_path / "junction")
    subprocess.run(["cmd", "/c", "mklink", "/J", junction, str(tmp_path)], check=True)
    with pytest.raises(UnsafeDirectory, match="reparse point"):
        ensure_private_directory(junction, security)
    assert security.process_image(os.getpid()).lower() == sys.executable.lower()
