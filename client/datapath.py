"""The client's packet path: TUN <-> TunnelSession <-> UDP, on the asyncio loop.

Thin on purpose: every decision is in `push_protocol`, the batched socket work
(GRO, GSO, send errors) in `pushgate_io.udp`, shared with the dataplane.
Nothing here waits: the socket and the TUN are non-blocking, and a packet that
cannot be handed on at once is dropped and counted under its reason.
"""

import asyncio
import contextlib
import socket
from collections import Counter

from push_protocol.codec import Header, read_header
from push_protocol.drops import DropReason, PacketRejected
from push_protocol.session import TunnelSession
from pushgate_io import tso
from pushgate_io.tun import TunDevice
from pushgate_io.udp import DATAGRAM_BUDGET, BatchSocket

BATCH = 64  # packets read from the TUN per readiness callback
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
        socket_factory=socket.socket,
        partial_tcp: bool = False,
    ) -> None:
        self._loop = loop
        # told at once when the dataplane asks for new keys (REKEY_REQUIRED)
        self._on_rekey_requested = on_rekey_requested
        # told after a read that authenticated a packet (the connection waits for one)
        self._on_received = on_received
        self.session = session
        # TCP packets from the dataplane have partial checksums (pushgate_io/tso.py)
        self.partial_tcp = partial_tcp
        self.drops: Counter[DropReason] = Counter()
        self.error_reports: dict[str, int] = {}  # ICMP errors about what we sent, by errno
        self._tun = tun
        self._server = server
        self._clock = clock
        # (family, type) -> a socket: socket.socket, or pushgate_io.memory's in tests
        self._socket_factory = socket_factory
        self._udp: BatchSocket | None = None

    def start(self) -> None:
        self._loop.add_reader(self._tun.fileno(), self.on_tun_readable)
        self.rebind()

    def rebind(self) -> None:
        """A new UDP socket (a new source port): how a client roams or recovers."""
        self._close_socket()
        family = socket.AF_INET6 if ":" in self._server[0] else socket.AF_INET
        sock = self._socket_factory(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setblocking(False)
        sock.connect(self._server)
        self._udp = BatchSocket(sock, on_error=self._udp_error, error_reports=self.error_reports)
        self._loop.add_reader(sock.fileno(), self.on_udp_readable)

    def move(self, session: TunnelSession, server: tuple[str, int]) -> None:
        """Send to another gateway's dataplane with its session (its wire keys), from
        a new socket: the TUN stays as it is."""
        self.session = session
        self._server = server
        self.rebind()

    @property
    def server(self) -> tuple[str, int]:
        return self._server

    @property
    def local_port(self) -> int:
        return self._udp.sock.getsockname()[1] if self._udp else 0

    def stop(self) -> None:
        self._loop.remove_reader(self._tun.fileno())
        self._close_socket()

    def _close_socket(self) -> None:
        if self._udp is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.sock.close()
            self._udp = None

    def _udp_error(self, kind: str, error: OSError, address) -> None:
        """A receive call that failed is a lost datagram; a refused send's
        datagrams are counted by BatchSocket."""
        if kind == "udp_recv":
            self.drops[DropReason.SOCKET_ERROR] += 1

    def send_keepalive(self) -> None:
        try:
            datagram = self.session.seal_keepalive(self._clock())
        except PacketRejected as rejected:
            self.drops[rejected.reason] += 1
            return
        reason = self._udp.send_datagram(datagram, None)
        if reason is not None:
            self.drops[reason] += 1

    def tick(self) -> None:
        now = self._clock()
        self.session.handle_timer(now)
        if self.session.keepalive_due(now):
            self.send_keepalive()

    def on_tun_readable(self) -> None:
        """Seal and send what waits on the TUN (the event loop calls this)."""
        packets = self._tun.read_packets(BATCH)
        if self._tun.partial_tcp:  # TSO reads (LinuxHost): the dataplane takes complete ones
            read = len(packets)
            # (an empty packet stands for a read that could not be cut: pushgate_io/tso.py)
            packets = [tso.complete(packet) for packet in packets if packet]
            if len(packets) < read:
                self.drops[DropReason.INNER_MALFORMED] += read - len(packets)
        datagrams, rejected = self.session.seal_many(packets, self._clock())
        for reason in rejected:
            self.drops[reason] += 1
        _, done = self._udp.send(datagrams, None, self.drops)
        if done < len(datagrams):  # the socket is full: nothing here waits
            self.drops[DropReason.QUEUE_FULL] += len(datagrams) - done

    def on_udp_readable(self) -> None:
        """Open what waits on the UDP socket and write it to the TUN (the event
        loop calls this)."""
        now = self._clock()
        drops = self.drops
        session = self.session
        received_before = session.last_received_at
        packets: list[bytes] = []  # for the TUN, written together at the end
        try:
            for datagrams, _ in self._udp.receive(DATAGRAM_BUDGET):
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
        TCP flow merged, pushgate_io/gro.py); count each one it did not take."""
        tun = self._tun
        for buffers, count in tun.coalesce(packets, self.partial_tcp):
            try:
                if not tun.write_buffers(buffers):
                    self.drops[DropReason.QUEUE_FULL] += count
            except OSError:
                self.drops[DropReason.TUN_WRITE_ERROR] += count


class GatewayProbe:
    """A keepalive to another gateway's dataplane, sealed with its session (its wire
    keys), from a socket of its own beside the tunnel; `answered` is called once an
    authenticated answer comes (client/core.py decides what it means)."""

    def __init__(self, loop, session: TunnelSession, server, clock, answered) -> None:
        self._loop = loop
        self._session = session
        self._clock = clock
        self._answered = answered
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.connect(server)
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def send(self) -> None:
        with contextlib.suppress(OSError, PacketRejected):  # no answer: nothing moves
            self._sock.send(self._session.seal_keepalive(self._clock()))

    def _on_readable(self) -> None:
        now = self._clock()
        while True:
            try:
                datagram = self._sock.recv(65535)
            except OSError:  # drained, or an ICMP error about the probe
                return
            header = read_header(datagram, True)
            if type(header) is not Header:
                continue
            results = self._session.open_many([datagram], [header], now)
            if any(type(result) is bytes for result in results):
                self.close()
                self._answered()
                return

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
