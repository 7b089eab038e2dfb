"""The conntrack cleaner (dataplane/conntrack.py): a privileged child that deletes an
ended session's connection-tracking entries, driven without ever blocking.

The child runs in a network namespace of the test's own (its conntrack table is the
namespace's), started as the dataplane starts it; entries are made by real UDP
sockets in the namespace and read back over netlink.
"""

import asyncio
import fcntl
import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest

from dataplane.conntrack import MAX_LINE, ConntrackCleaner, tunnel_host
from dataplane.metrics import Counters
from dataplane.registry import Registry, RegistryObserver, packed_address
from dataplane.sync import SessionSync
from netlab import Lab, wait_for
from netlab.feed import session
from push_protocol.lifecycle import SessionEnd
from pushgate_api import control_pb2

NETWORK = ipaddress.ip_network("198.19.0.0/24")
GATEWAY = ipaddress.ip_address("198.19.0.1")
ENDED, OTHER = "198.19.0.2", "198.19.0.3"  # an ended session's address; a live one's
LAN = "198.18.0.9"  # stands for a lan host
F_SETPIPE_SZ = 1031

# Conntrack sees a namespace's packets once some hook needs it (as --nat's masquerade).
TRACKING = """
table ip pgtest {
  chain out { type filter hook output priority 0; ct state new accept; }
}
"""

FLOWS = f"""
import socket
for source, destination in (("{ENDED}", "{LAN}"), ("{LAN}", "{ENDED}"), ("{OTHER}", "{LAN}")):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.sendto(b"flow", (destination, 5003))
"""

LIST = """
from pyroute2 import Conntrack
for entry in Conntrack().dump_entries():
    print(entry.tuple_orig.saddr, entry.tuple_orig.daddr)
"""


def test_only_host_addresses_of_the_tunnel_network_are_accepted():
    assert tunnel_host("198.19.0.2", NETWORK, GATEWAY) == ipaddress.ip_address("198.19.0.2")
    for text, why in (
        ("198.18.0.9", "not in the tunnel network"),
        ("198.19.0.1", "the gateway's own address"),
        ("2001:db8::1", "not in the tunnel network"),
        ("198.19.0.2; reboot", "does not appear to be"),
        ("", "does not appear to be"),
    ):
        with pytest.raises(ValueError, match=why):
            tunnel_host(text, NETWORK, GATEWAY)


def test_the_registry_reports_every_address_a_session_stops_owning():
    released = []

    class Released(RegistryObserver):
        def address_released(self, address: bytes) -> None:
            released.append(address)

    registry = Registry()
    registry.observe(Released())
    sync = SessionSync(registry, Counters(), "/nonexistent")
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=100))
    revision = 0

    def event(**change) -> None:
        nonlocal revision
        revision += 1
        sync.apply(control_pb2.SessionEvent(revision=revision, **change))

    event(installed=session(1, "198.19.0.2"))
    event(installed=session(2, "198.19.0.3"))
    assert released == []
    event(removed=control_pb2.SessionRemoval(session_id=1))  # logout or expiry
    event(installed=session(2, "198.19.0.4"))  # the auth service readdressed it
    event(installed=session(3, "198.19.0.4"))  # a newer session takes an address over
    registry.remove(3, SessionEnd.EXPIRED)  # as the dataplane's own expiry does
    gone = ("198.19.0.2", "198.19.0.3", "198.19.0.4", "198.19.0.4")
    assert released == [packed_address(address) for address in gone]


@pytest.fixture
def ns():
    with Lab("pgct") as lab:
        ns = lab.namespace("gw")
        for address in (ENDED, OTHER, LAN):
            lab.exec(ns, ["ip", "address", "add", f"{address}/32", "dev", "lo"])
        lab.exec(ns, ["nft", "-f", "-"], input=TRACKING)
        yield lab, ns


def entries(lab: Lab, ns: str) -> set[tuple[str, str]]:
    out = lab.exec(ns, [sys.executable, "-c", LIST]).stdout
    return {tuple(line.split()) for line in out.splitlines()}


def child(lab: Lab, ns: str, *wrapper: str) -> subprocess.Popen:
    """The cleaner's child as the dataplane starts it (`wrapper`: take privileges away)."""
    return lab.start(
        ns,
        [*wrapper, sys.executable, "-m", "dataplane.conntrack", str(NETWORK), str(GATEWAY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


def until(loop: asyncio.AbstractEventLoop, predicate, timeout: float = 10, what: str = "it"):
    """Run the event loop (the cleaner's pipes) until `predicate()` holds."""

    async def poll():
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.02)

    loop.run_until_complete(poll())


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle)


@pytest.mark.netns
def test_an_ended_sessions_entries_are_deleted_by_a_child_holding_net_admin_only(ns):
    lab, gw = ns
    lab.exec(gw, [sys.executable, "-c", FLOWS])
    made = entries(lab, gw)
    assert {(ENDED, LAN), (LAN, ENDED), (OTHER, LAN)} <= made
    loop = asyncio.new_event_loop()
    cleaner = ConntrackCleaner(child(lab, gw), loop)
    try:
        until(loop, lambda: cleaner.ready, what="the child to say ready")
        # `ip netns exec` execs the child: its PID is the cleaner's child process
        seen = status(cleaner.process.pid)
        net_admin = f"{1 << 12:016x}"
        assert (seen["CapEff"], seen["CapPrm"], seen["CapBnd"]) == (net_admin,) * 3
        assert (seen["CapInh"], seen["CapAmb"]) == ("0" * 16,) * 2
        assert seen["NoNewPrivs"] == "1"
        assert seen["Uid"].split() == ["65534"] * 4  # root became nobody

        cleaner.forget(ipaddress.ip_address(ENDED).packed)  # as the registry says it
        until(loop, lambda: cleaner.results["ok"] == 1, what="the answer")
        assert cleaner.entries_deleted == 2  # original source, original destination
        assert entries(lab, gw) == made - {(ENDED, LAN), (LAN, ENDED)}

        samples = {
            (sample.name, sample.labels.get("result")): sample.value
            for family in cleaner.collect()
            for sample in family.samples
        }
        assert samples[("pushgate_dataplane_conntrack_cleanups_total", "ok")] == 1
        assert samples[("pushgate_dataplane_conntrack_cleanups_total", "failed")] == 0
        assert samples[("pushgate_dataplane_conntrack_entries_deleted_total", None)] == 2
        assert samples[("pushgate_dataplane_conntrack_cleaner_up", None)] == 1
    finally:
        cleaner.close()
        loop.close()


@pytest.mark.netns
def test_a_root_child_that_may_not_change_user_still_keeps_net_admin_alone(ns):
    """Started as root with CAP_NET_ADMIN as its only capability (a unit's bounding
    set): it stays uid 0, says so, and works."""
    lab, gw = ns
    lab.exec(gw, [sys.executable, "-c", FLOWS])
    bounded = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all", "--"]
    process = child(lab, gw, *bounded)
    process.stdin.write(f"{ENDED}\n".encode())
    process.stdin.flush()
    assert process.stdout.readline() == b"ready\n"
    assert process.stdout.readline() == f"ok {ENDED} 2\n".encode()
    seen = status(process.pid)
    assert (seen["CapEff"], seen["CapPrm"], seen["CapBnd"]) == (f"{1 << 12:016x}",) * 3
    assert seen["Uid"].split() == ["0"] * 4 and seen["NoNewPrivs"] == "1"
    process.stdin.close()
    assert process.wait(10) == 0


@pytest.mark.netns
def test_the_child_refuses_what_is_not_a_tunnel_host(ns):
    lab, gw = ns
    lab.exec(gw, [sys.executable, "-c", FLOWS])
    made = entries(lab, gw)
    process = child(lab, gw)
    lines = [LAN, str(GATEWAY), "bogus", "9" * (MAX_LINE + 1)]
    out, _ = process.communicate("".join(f"{line}\n" for line in lines).encode(), timeout=30)
    answers = out.decode().splitlines()
    assert answers[0] == "ready"
    assert answers[1] == f"failed {LAN} refused: {LAN} is not in the tunnel network {NETWORK}"
    assert answers[2] == f"failed {GATEWAY} refused: {GATEWAY} is the gateway's own address"
    assert answers[3].startswith("failed bogus refused:")
    assert answers[4].startswith("failed - refused: a line of")
    assert entries(lab, gw) == made  # nothing deleted


@pytest.mark.netns
def test_forget_never_waits_on_the_child_and_counts_what_it_could_not_queue(ns):
    lab, gw = ns
    loop = asyncio.new_event_loop()
    cleaner = ConntrackCleaner(child(lab, gw), loop, backlog=50)
    try:
        until(loop, lambda: cleaner.ready, what="the child to say ready")
        fcntl.fcntl(cleaner.process.stdin.fileno(), F_SETPIPE_SZ, 4096)  # a small pipe
        os.kill(cleaner.process.pid, signal.SIGSTOP)  # a child that answers nothing
        # stopped before the first write: SIGSTOP takes effect when the child is next
        # scheduled, and a child still running on the other core reads what comes first
        wait_for(lambda: stopped(cleaner.process.pid), 10, 0.01, what="the child stopped")
        addresses = [str(host) for host in NETWORK.hosts() if host != GATEWAY] * 3
        slowest = 0.0
        for address in addresses:
            started = time.perf_counter()
            cleaner.forget(address)
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.5  # a write that blocked would never return: the pipe is full
        # taken: what fit the pipe (4096 bytes, 11-13 per line) and the backlog (50)
        refused = cleaner.results["failed"]
        assert len(addresses) - 50 - 4096 // 11 - 1 <= refused <= len(addresses) - 50 - 4096 // 13
        os.kill(cleaner.process.pid, signal.SIGCONT)
        until(
            loop,
            lambda: cleaner.results["ok"] + cleaner.results["failed"] == len(addresses),
            timeout=60,
            what="every address to be answered or counted",
        )
        assert cleaner.results["ok"] > 0

        cleaner.process.kill()  # the child dies: what it had not answered, and what
        cleaner.forget(ENDED)  # comes after, is counted as failed
        until(loop, lambda: cleaner.gone, what="the parent to notice")
        cleaner.forget(OTHER)
        assert cleaner.results["ok"] + cleaner.results["failed"] == len(addresses) + 2
        assert not cleaner.ready
    finally:
        cleaner.close()
        loop.close()


@pytest.mark.netns
def test_a_child_started_without_net_admin_says_so_and_every_cleanup_counts_as_failed(ns):
    """What happens when the dataplane dropped its capabilities before starting it."""
    lab, gw = ns
    no_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    loop = asyncio.new_event_loop()
    cleaner = ConntrackCleaner(child(lab, gw, *no_capabilities), loop)
    try:
        until(loop, lambda: cleaner.gone, what="the child to refuse")
        cleaner.forget(ENDED)
        assert (cleaner.ready, cleaner.results) == (False, {"ok": 0, "failed": 1})
    finally:
        cleaner.close()
        loop.close()
    wait_for(lambda: cleaner.process.poll() is not None, 5, what="the child to exit")
    assert cleaner.process.returncode == 1
