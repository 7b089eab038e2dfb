"""The client's packet path: TUN <-> TunnelSession <-> UDP, on the asyncio loop.

Thin on purpose: every decision is in `push_protocol`. Nothing here waits: the
socket and the TUN are non-blocking, and a packet that cannot be handed on at
once is dropped and counted under its reason.
"""

import asyncio
import errno
import socket
from collections import Counter

import udpio
from push_protocol.codec import Header, read_header
from push_protocol.drops import DropReason, PacketRejected
from push_protocol.session import TunnelSession

from .tun import TunDevice

BATCH = 64  # packets handled per readiness callback before yielding to the loop
# Datagrams from the gateway opened per callback before their packets go to the
# TUN: with GRO one receive brings dozens, and a packet waits for the whole
# callback (64 is the dataplane's choice too, docs/performance.md).
DATAGRAM_BUDGET = 64
RECV_SIZE = 65536
SOCKET_BUFFER_BYTES = 4 << 20  # absorbs bursts while the loop is busy with the TUN


class Datapath:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session: TunnelSession,
        tun: TunDevice,
        server: tuple[str, int],
        clock,
        on_rekey_requested=lambda: None,
        on_received=lambda: None,
    ) -> None:
        self._loop = loop
        # told at once when the dataplane asks for new keys (REKEY_REQUIRED)
        self._on_rekey_requested = on_rekey_requested
        # told after a read that authenticated a packet (the connection waits for one)
        self._on_received = on_received
        self.session = session
        self._tun = tun
        self._server = server
        self._clock = clock
        self._sock: socket.socket | None = None
        self._gso = self._gro = False  # batched UDP send / receive (udpio), where the OS has it
        self.drops: Counter[DropReason] = Counter()

    def start(self) -> None:
        self._loop.add_reader(self._tun.fileno(), self._on_tun_readable)
        self.rebind()

    def rebind(self) -> None:
        """A new UDP socket (a new source port): how a client roams or recovers."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        family = socket.AF_INET6 if ":" in self._server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setblocking(False)
        sock.connect(self._server)
        self._gso = udpio.gso_capable(sock)
        self._gro = udpio.enable_gro(sock)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_udp_readable)

    @property
    def local_port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else 0

    def stop(self) -> None:
        self._loop.remove_reader(self._tun.fileno())
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _send(self, datagram: bytes) -> None:
        try:
            self._sock.send(datagram)
        except BlockingIOError:
            self.drops[DropReason.QUEUE_FULL] += 1
        except OSError:
            # ICMP unreachable from an earlier send, no route, ...: count, go on.
            self.drops[DropReason.SOCKET_ERROR] += 1

    def send_keepalive(self) -> None:
        try:
            self._send(self.session.seal_keepalive(self._clock()))
        except PacketRejected as rejected:
            self.drops[rejected.reason] += 1

    def tick(self) -> None:
        now = self._clock()
        self.session.handle_timer(now)
        if self.session.keepalive_due(now):
            self.send_keepalive()

    def _send_batch(self, datagrams: list[bytes]) -> None:
        """Send in as few calls as UDP GSO allows; each datagram's fate is counted."""
        for run in udpio.runs(datagrams):
            if len(run) == 1:
                self._send(run[0])
                continue
            try:
                udpio.send_run(self._sock, run)
            except BlockingIOError:
                self.drops[DropReason.QUEUE_FULL] += len(run)
            except OSError as error:
                if error.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                    self._gso = False  # the path can't segment: one by one from now on
                    for datagram in run:
                        self._send(datagram)
                else:
                    self.drops[DropReason.SOCKET_ERROR] += len(run)

    def _on_tun_readable(self) -> None:
        packets = self._tun.read_packets(BATCH)
        datagrams, rejected = self.session.seal_many(packets, self._clock())
        for reason in rejected:
            self.drops[reason] += 1
        if self._gso:
            self._send_batch(datagrams)
        else:
            for datagram in datagrams:
                self._send(datagram)

    def _on_udp_readable(self) -> None:
        now = self._clock()
        sock = self._sock
        gro = self._gro
        drops = self.drops
        session = self.session
        received_before = session.last_received_at
        packets: list[bytes] = []  # for the TUN, written together at the end
        budget = DATAGRAM_BUDGET
        try:
            while budget > 0:  # the loop calls back at once if more is waiting
                try:
                    if gro:
                        data, ancdata, _, _ = sock.recvmsg(RECV_SIZE, udpio.GRO_CMSG_SPACE)
                        datagrams = udpio.split(data, ancdata) if ancdata else (data,)
                    else:
                        datagrams = (sock.recv(RECV_SIZE),)
                except BlockingIOError:
                    return
                except OSError:
                    drops[DropReason.SOCKET_ERROR] += 1
                    continue
                budget -= len(datagrams)
                well_formed, headers = [], []
                for datagram in datagrams:
                    header = read_header(datagram, True)  # from the dataplane
                    if type(header) is Header:
                        well_formed.append(datagram)
                        headers.append(header)
                    else:
                        drops[header] += 1
                # a GRO receive is a run of one session: opened in one call
                for result in session.open_many(well_formed, headers, now):
                    if type(result) is bytes:
                        if result:
                            packets.append(result)
                        elif session.rekey_requested:  # empty: a keepalive, or this
                            self._on_rekey_requested()
                    else:
                        drops[result] += 1
        finally:
            if packets:
                self._write_tun(packets)
            if session.last_received_at != received_before:
                self._on_received()

    def _write_tun(self, packets: list[bytes]) -> None:
        """Hand `packets` to the TUN in as few writes as it allows (segments of a
        TCP flow merged, tundev/gro.py); count each one it did not take."""
        tun = self._tun
        for buffers, count in tun.coalesce(packets):
            try:
                if not tun.write_buffers(buffers):
                    self.drops[DropReason.QUEUE_FULL] += count
            except OSError:
                self.drops[DropReason.TUN_WRITE_ERROR] += count
