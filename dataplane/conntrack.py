"""Forget the kernel's connection tracking (NAT) state of ended sessions' addresses.

When a session ends, the kernel still holds conntrack entries for its tunnel
address: a UDP flow the lan keeps alive, a TCP connection (established entries
live five days), with their NAT mappings. Were the address handed to another
user, the lan's packets of the old flows would be translated to it and delivered
into the new user's tunnel. So when the dataplane removes a session it deletes
every entry whose original source or original destination is one of the
session's addresses.

Deleting entries needs CAP_NET_ADMIN, which the internet-facing dataplane gives
up once it is set up. The deletion therefore runs in a small child process
(privilege separation, as OpenSSH's monitor), started before the dataplane drops
its capabilities: it keeps CAP_NET_ADMIN only (and becomes user nobody when
started as root), reads one address per line from its parent, refuses any that
is not a host address of the tunnel network, deletes the entries over netlink
(pyroute2's ctnetlink) and answers one line per address:

    parent -> child   "198.19.0.2\\n"
    child -> parent   "ready\\n" once, or "unavailable REASON\\n" and exit
                      "ok 198.19.0.2 3\\n" (entries deleted) | "failed 198.19.0.2 REASON\\n"

The parent never waits on it: `ConntrackCleaner.forget` queues a line and
returns; lines are written and answers read when the pipes are ready, on the
event loop, and counted (pushgate_dataplane_conntrack_cleanups_total{result}).

    python -m dataplane.conntrack TUNNEL_NETWORK GATEWAY_ADDRESS    (the child)
"""

import asyncio
import errno
import ipaddress
import logging
import os
import pwd
import socket
import subprocess
import sys
from collections import deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .privileges import (
    CAP_NET_ADMIN,
    CAP_SETGID,
    CAP_SETPCAP,
    CAP_SETUID,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
    current_capabilities,
    drop_bounding_set,
    prctl,
    set_capabilities,
)
from .registry import RegistryObserver

log = logging.getLogger("pushgate.dataplane.conntrack")

MAX_LINE = 64  # an address line, with room to spare (an IPv6 address is <= 45 characters)
MAX_BACKLOG = 4096  # addresses waiting for the child; more is a counted failure
RESULTS = ("ok", "failed")


def tunnel_host(text: str, network, gateway) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address in `text` if it may be forgotten: a host of the tunnel network other
    than the gateway's own. Raises ValueError, with the reason, for anything else."""
    address = ipaddress.ip_address(text)  # ValueError names the text
    if address not in network:
        raise ValueError(f"{address} is not in the tunnel network {network}")
    if address == gateway:
        raise ValueError(f"{address} is the gateway's own address")
    return address


class ConntrackCleaner(RegistryObserver):
    """The dataplane's side: `forget(address)` queues and returns; results are counted.
    It observes the registry: every address a session stops owning is forgotten.

    Start it (`spawn`) before the dataplane drops its capabilities: a child started
    later has no CAP_NET_ADMIN to keep, says so, and every cleanup counts as failed.
    """

    def __init__(
        self,
        process: subprocess.Popen,
        loop: asyncio.AbstractEventLoop,
        backlog: int = MAX_BACKLOG,
    ) -> None:
        self.process = process
        self.backlog = backlog
        self._loop = loop
        self._to_child = process.stdin.fileno()
        self._from_child = process.stdout.fileno()
        os.set_blocking(self._to_child, False)
        os.set_blocking(self._from_child, False)
        self._backlog: deque[bytes] = deque()  # lines not yet written
        self._partial = b""  # the unwritten rest of a line the pipe took in part
        self._answers = b""  # what the child wrote after its last complete line
        self._writing = False
        self._awaiting = 0  # lines written, not yet answered
        self.ready = False  # the child holds CAP_NET_ADMIN and answers
        self.gone = False  # the child exited or refused to work
        self.results = dict.fromkeys(RESULTS, 0)
        self.entries_deleted = 0
        loop.add_reader(self._from_child, self._read)

    @classmethod
    def spawn(cls, network, gateway, loop: asyncio.AbstractEventLoop) -> "ConntrackCleaner":
        process = subprocess.Popen(
            [sys.executable, "-m", "dataplane.conntrack", str(network), str(gateway)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,  # the child holds no socket, TUN or key of ours
        )
        return cls(process, loop)

    def address_released(self, address: bytes) -> None:
        self.forget(address)

    def forget(self, address: bytes | str) -> None:
        """Delete the conntrack entries of `address` (raw 4/16 bytes or text), later."""
        text = str(ipaddress.ip_address(address))
        if self.gone:
            self._failed(text, "the cleaner process is not running")
            return
        if len(self._backlog) >= self.backlog:
            self._failed(text, f"{self.backlog} addresses already wait for the cleaner")
            return
        self._backlog.append(text.encode() + b"\n")
        self._write()

    def close(self) -> None:
        loop = self._loop
        loop.remove_reader(self._from_child)
        if self._writing:
            loop.remove_writer(self._to_child)
        self.process.stdin.close()  # the child exits at end of input
        self.process.stdout.close()
        try:
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    # -- the pipes (event loop callbacks; never blocking) ----------------------------

    def _write(self) -> None:
        while self._partial or self._backlog:
            chunk = self._partial or self._backlog[0]
            try:
                written = os.write(self._to_child, chunk)
            except BlockingIOError:
                break
            except BrokenPipeError:
                self._child_gone("it closed its input")
                return
            if not self._partial:
                self._backlog.popleft()
                self._awaiting += 1
            self._partial = chunk[written:]
        pending = bool(self._partial or self._backlog)
        if pending != self._writing:
            if pending:
                self._loop.add_writer(self._to_child, self._write)
            else:
                self._loop.remove_writer(self._to_child)
            self._writing = pending

    def _read(self) -> None:
        try:
            data = os.read(self._from_child, 65536)
        except BlockingIOError:
            return
        if not data:
            self._child_gone(f"it exited (status {self.process.poll()})")
            return
        *lines, self._answers = (self._answers + data).split(b"\n")
        for line in lines:
            self._answer(line.decode(errors="replace"))

    def _answer(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "ready":
            self.ready = True
            log.info("conntrack cleaner ready (pid %d, CAP_NET_ADMIN only)", self.process.pid)
            return
        if kind == "unavailable":
            self._child_gone(rest)
            return
        self._awaiting = max(0, self._awaiting - 1)
        if kind == "ok":
            address, _, count = rest.partition(" ")
            self.results["ok"] += 1
            self.entries_deleted += int(count)
            if int(count):
                log.info("conntrack: %s entries of %s deleted", count, address)
        else:
            address, _, why = rest.partition(" ")
            self._failed(address, why)

    def _failed(self, address: str, why: str) -> None:
        self.results["failed"] += 1
        log.warning("conntrack entries of %s not deleted: %s", address, why)

    def _child_gone(self, why: str) -> None:
        if self.gone:
            return
        self.gone, self.ready = True, False
        log.error("conntrack cleaner stopped: %s; ended sessions' NAT state stays", why)
        self._loop.remove_reader(self._from_child)
        if self._writing:
            self._loop.remove_writer(self._to_child)
            self._writing = False
        # (a line written in part is among the awaited ones)
        self.results["failed"] += self._awaiting + len(self._backlog)
        self._backlog.clear()
        self._awaiting, self._partial = 0, b""

    # -- Prometheus (a collector of its own, read at scrape time) --------------------

    def collect(self):
        prefix = "pushgate_dataplane_conntrack_"
        cleanups = CounterMetricFamily(
            prefix + "cleanups",
            "Ended sessions' addresses whose conntrack (NAT) entries were deleted, by result",
            labels=["result"],
        )
        for result, value in self.results.items():
            cleanups.add_metric([result], value)
        yield cleanups
        deleted = CounterMetricFamily(
            prefix + "entries_deleted", "Conntrack entries deleted for ended sessions"
        )
        deleted.add_metric([], self.entries_deleted)
        yield deleted
        up = GaugeMetricFamily(
            prefix + "cleaner_up", "1 while the privileged conntrack cleaner process answers"
        )
        up.add_metric([], int(self.ready))
        yield up


# -- the child ---------------------------------------------------------------------------


def keep_only_net_admin() -> None:
    """Give up every privilege but CAP_NET_ADMIN, for good.

    The bounding set loses everything else (while CAP_SETPCAP allows it); root becomes
    nobody (where CAP_SETUID and CAP_SETGID allow it), keeping its permitted set across
    the switch (PR_SET_KEEPCAPS) so it can raise CAP_NET_ADMIN again; no ambient or
    inheritable capabilities; and no execve can ever grant more (PR_SET_NO_NEW_PRIVS)."""
    held = current_capabilities()
    effective, permitted = held.effective, held.permitted
    net_admin = 1 << CAP_NET_ADMIN
    if not permitted & net_admin:
        raise PermissionError("started without CAP_NET_ADMIN")
    if effective & (1 << CAP_SETPCAP):
        drop_bounding_set(keep=net_admin)
    switch = (1 << CAP_SETUID) | (1 << CAP_SETGID)
    if 0 in os.getresuid() and effective & switch == switch:
        nobody = pwd.getpwnam("nobody")
        prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
        os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
        prctl(PR_SET_KEEPCAPS, 0)
    elif 0 in os.getresuid():
        # (e.g. a unit whose bounding set holds CAP_NET_ADMIN alone): no capability
        # but CAP_NET_ADMIN all the same, yet root's own files stay readable: say so
        print("conntrack cleaner: no CAP_SETUID/CAP_SETGID; it stays uid 0", file=sys.stderr)
    set_capabilities(net_admin)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class ConntrackTable:
    """The kernel's conntrack table over netlink (pyroute2), one socket per family."""

    def __init__(self) -> None:
        # Imported here: only the child needs pyroute2, and it imports it before it
        # becomes nobody (who may not read the virtualenv).
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        self._match, self._netlink_error = NFCTAttrTuple, NetlinkError
        self._tables = {
            4: Conntrack(nfgen_family=socket.AF_INET),
            6: Conntrack(nfgen_family=socket.AF_INET6),
        }

    def check(self) -> None:
        """Fail now, not at the first session end, without the right to read the table."""
        self._tables[4].count()

    def delete(self, address) -> int:
        """Delete every entry whose original source or destination is `address`;
        returns how many were deleted."""
        table = self._tables[address.version]
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        deleted, refused = 0, []
        for side in ("saddr", "daddr"):
            match = self._match(family=family, **{side: str(address)})
            for entry in list(table.dump_entries(tuple_orig=match)):
                try:
                    table.entry("del", tuple_orig=entry.tuple_orig)
                except self._netlink_error as error:
                    if error.code != errno.ENOENT:  # ENOENT: gone meanwhile (timed out)
                        refused.append(error)
                    continue
                deleted += 1
        if refused:  # the others are deleted all the same
            error = refused[0]
            raise OSError(
                error.code, f"{deleted} deleted, {len(refused)} refused: {os.strerror(error.code)}"
            )
        return deleted


def serve(network, gateway, table: ConntrackTable, lines, answer) -> None:
    """Answer each address line (the child's loop, blocking; ends at end of input)."""
    for raw in lines:
        text = raw.decode(errors="replace").strip()
        if len(raw) > MAX_LINE:
            answer(f"failed - refused: a line of {len(raw)} bytes")
            continue
        try:
            address = tunnel_host(text, network, gateway)
        except ValueError as error:
            answer(f"failed {text or '-'} refused: {error}")
            continue
        try:
            answer(f"ok {address} {table.delete(address)}")
        except OSError as error:  # NetlinkError is an OSError
            answer(f"failed {address} {error}")


def main(argv: list[str]) -> int:
    network = ipaddress.ip_network(argv[0])
    gateway = ipaddress.ip_address(argv[1])
    out = sys.stdout

    def answer(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    try:
        table = ConntrackTable()  # (imports and sockets while files are still readable)
        keep_only_net_admin()
        table.check()
    except (OSError, KeyError) as error:
        answer(f"unavailable {error}")
        return 1
    answer("ready")
    serve(
        network, gateway, table, iter(lambda: sys.stdin.buffer.readline(MAX_LINE + 1), b""), answer
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
