"""In-memory stand-ins for the UDP socket and the TUN, as wireguard-go's
tun/tuntest and conn/bindtest or httpcore's mock streams: the dataplane's
`Device` and the client's `Datapath` run on them unchanged, in one process,
without root or namespaces, and tests and benchmarks drive and inspect them.

- `MemoryNetwork` carries datagrams between the `MemoryUdp` sockets bound on it,
  by address. It plays the kernel's part that our code relies on: UDP GSO
  (`sendmsg` with UDP_SEGMENT is cut into its datagrams), UDP GRO (a receiver
  that asked for it gets one GSO send glued, with its segment size), a bounded
  receive queue (what overflows is lost, as the kernel drops it), ephemeral
  ports, and a sender's source address. What it does not play: ICMP (a datagram
  to an address nobody is bound on is lost, silently), an error queue, routing.
- `MemoryUdp.block_sends()` makes sends fail with EAGAIN and the socket not
  writable until `unblock_sends()`; `fail_sends(errno, ...)` makes the next send
  calls fail with those errors; `refuse_gso` fails GSO sends with EIO, as a
  device that cannot segment does.
- `MemoryTun` has packets put in with `inject` and keeps what was written in
  `written`; `block_writes()` makes writes return False (the kernel's EAGAIN).

Readiness is real: each stand-in's `fileno()` is one end of a socketpair that
is readable while packets wait and writable while writes would go through, so
an asyncio loop waits on them as on the real things.
"""

import errno
import socket
import struct
from collections import deque

from . import gro, tso
from .udp import GRO_CMSG_SPACE, SOL_UDP, UDP_GRO, UDP_SEGMENT

# A receive queue's length (a glued GSO send is one item) before datagrams are lost.
RECEIVE_QUEUE_LENGTH = 4096
_GRO_SIZE = struct.Struct("=i")
_SEGMENT = struct.Struct("=H")
_FILL = bytes(4096)


class _Readiness:
    """A descriptor for the event loop: readable while `readable(True)`, not
    writable while `writable(False)` (its send buffer is kept full)."""

    def __init__(self) -> None:
        self._loop_end, self._far_end = socket.socketpair()
        for end in (self._loop_end, self._far_end):
            end.setblocking(False)
        self._loop_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self._readable = False
        self.blocked = False  # writes would fail now (EAGAIN)

    def fileno(self) -> int:
        return self._loop_end.fileno()

    def readable(self, flag: bool) -> None:
        if flag and not self._readable:
            self._far_end.send(b"\0")
        elif not flag and self._readable:
            self._loop_end.recv(1)
        self._readable = flag

    def writable(self, flag: bool) -> None:
        self.blocked = not flag
        if self.blocked:
            try:
                while True:
                    self._loop_end.send(_FILL)
            except BlockingIOError:
                pass
        else:
            try:
                while self._far_end.recv(65536):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        self._loop_end.close()
        self._far_end.close()


class MemoryNetwork:
    """The datagrams between `MemoryUdp` sockets, by address."""

    def __init__(self) -> None:
        self.bound: dict[tuple[str, int], MemoryUdp] = {}
        self.lost = 0  # datagrams to nobody, or over a full receive queue
        self._next_port = 40000

    def socket(
        self,
        family: int = socket.AF_INET,
        kind: int = socket.SOCK_DGRAM,
        *,
        host: str,
        offloads: bool = True,
    ):
        """A UDP socket on `host`: the signature of socket.socket, `host` aside
        (functools.partial(network.socket, host=...) is a socket factory).
        `offloads=False`: a system without UDP GSO and GRO (older Linux, Windows)."""
        if kind != socket.SOCK_DGRAM:
            raise ValueError("a memory network carries datagrams only")
        return MemoryUdp(self, family, host, offloads)

    def _bind(self, sock: "MemoryUdp", address: tuple[str, int]) -> tuple[str, int]:
        host, port = address[0], address[1]
        if port == 0:
            while (host, self._next_port) in self.bound:
                self._next_port += 1
            port = self._next_port
            self._next_port += 1
        if (host, port) in self.bound:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is in use")
        self.bound[(host, port)] = sock
        return host, port

    def _deliver(self, source: tuple[str, int], destination, datagrams: list[bytes]) -> None:
        receiver = self.bound.get((destination[0], destination[1]))
        if receiver is None or len(receiver._queue) >= receiver.receive_queue_length:
            self.lost += len(datagrams)
            return
        if receiver.gro and len(datagrams) > 1:  # one GSO send, glued back
            receiver._queue.append((b"".join(datagrams), len(datagrams[0]), source))
        else:
            receiver._queue.extend((datagram, 0, source) for datagram in datagrams)
        receiver._readiness.readable(True)


class MemoryUdp:
    """A non-blocking UDP socket on a `MemoryNetwork` (the calls our code makes)."""

    def __init__(self, network: MemoryNetwork, family: int, host: str, offloads: bool) -> None:
        self.network = network
        self.offloads = offloads
        self.family = family
        self.type = socket.SOCK_DGRAM
        self.host = host
        self.address: tuple[str, int] | None = None
        self.peer: tuple[str, int] | None = None
        self.options: dict[tuple[int, int], int] = {}
        self.gro = False
        self.refuse_gso = False
        self.receive_queue_length = RECEIVE_QUEUE_LENGTH
        self.send_calls = 0  # calls that handed datagrams to the network
        self._queue: deque[tuple[bytes, int, tuple]] = deque()
        self._send_errors: deque[int] = deque()
        self._readiness = _Readiness()

    # -- what tests do -----------------------------------------------------------

    def block_sends(self) -> None:
        self._readiness.writable(False)

    def unblock_sends(self) -> None:
        self._readiness.writable(True)

    def fail_sends(self, *errnos: int) -> None:
        """The next len(errnos) send calls fail with these errors, in order."""
        self._send_errors.extend(errnos)

    # -- the socket calls --------------------------------------------------------

    def fileno(self) -> int:
        return self._readiness.fileno()

    def setblocking(self, flag: bool) -> None:
        if flag:
            raise ValueError("memory sockets are non-blocking")

    def setsockopt(self, level: int, option: int, value) -> None:
        if level == SOL_UDP and not self.offloads:
            raise OSError(errno.ENOPROTOOPT, "no UDP offloads here")
        self.options[(level, option)] = value
        if (level, option) == (SOL_UDP, UDP_GRO):
            self.gro = bool(value)

    def getsockopt(self, level: int, option: int) -> int:
        if level == SOL_UDP and not self.offloads:
            raise OSError(errno.ENOPROTOOPT, "no UDP offloads here")
        if (level, option) == (SOL_UDP, UDP_SEGMENT):
            return 0  # GSO is there, no default segment size
        return self.options.get((level, option), 0)

    def bind(self, address) -> None:
        if self.address is not None:
            raise OSError(errno.EINVAL, "already bound")
        self.address = self.network._bind(self, (address[0] or self.host, address[1]))

    def connect(self, address) -> None:
        if self.address is None:
            self.bind((self.host, 0))
        self.peer = (address[0], address[1])

    def getsockname(self) -> tuple[str, int]:
        return self.address or ("0.0.0.0", 0)

    def close(self) -> None:
        if self.address is not None and self.network.bound.get(self.address) is self:
            del self.network.bound[self.address]
        self._readiness.close()

    def recvfrom(self, size: int):
        data, _, source = self._take(size)
        return data, source

    def recv(self, size: int) -> bytes:
        return self._take(size)[0]

    def recvmsg(self, size: int, ancillary_size: int = 0, flags: int = 0):
        if flags & getattr(socket, "MSG_ERRQUEUE", 0):
            raise BlockingIOError(errno.EAGAIN, "no error queue in memory")
        data, segment, source = self._take(size)
        ancdata = []
        if segment and ancillary_size >= GRO_CMSG_SPACE:
            ancdata.append((SOL_UDP, UDP_GRO, _GRO_SIZE.pack(segment)))
        return data, ancdata, 0, source

    def send(self, data: bytes) -> int:
        return self.sendto(data, None)

    def sendto(self, data: bytes, address) -> int:
        self._send([bytes(data)], address)
        return len(data)

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None) -> int:
        data = b"".join(buffers)
        segment = 0
        for level, kind, value in ancdata:
            if (level, kind) == (SOL_UDP, UDP_SEGMENT):
                segment = _SEGMENT.unpack(value)[0]
        if segment and self.refuse_gso:
            raise OSError(errno.EIO, "this device cannot segment")
        if segment and len(data) > segment:
            datagrams = [data[i : i + segment] for i in range(0, len(data), segment)]
        else:
            datagrams = [data]
        self._send(datagrams, address)
        return len(data)

    def _take(self, size: int):
        if not self._queue:
            raise BlockingIOError(errno.EAGAIN, "nothing waits")
        data, segment, source = self._queue.popleft()
        if not self._queue:
            self._readiness.readable(False)
        return data[:size], segment, source

    def _send(self, datagrams: list[bytes], address) -> None:
        if self._send_errors:
            number = self._send_errors.popleft()
            raise OSError(number, f"scripted: {errno.errorcode.get(number, number)}")
        if self._readiness.blocked:
            raise BlockingIOError(errno.EAGAIN, "send buffer full")
        destination = address if address is not None else self.peer
        if destination is None:
            raise OSError(errno.EDESTADDRREQ, "not connected")
        if self.address is None:
            self.bind((self.host, 0))
        self.send_calls += 1
        self.network._deliver(self.address, destination, datagrams)


class MemoryTun:
    """A TUN in memory: packets in with `inject`, out in `written` (one IP
    packet each); `writes` counts the write calls. With `offload`, writes are
    merged as by a Linux TUN with IFF_VNET_HDR (pushgate_io/gro.py) and only
    counted: what a benchmark of the merge needs."""

    def __init__(self, name: str = "mem0", *, offload: bool = False, partial_tcp=False) -> None:
        self.name = name
        self.offload = offload
        self.partial_tcp = partial_tcp  # `inject` takes packets in the partial form
        self.written: list[bytes] = []
        self.writes = 0
        self._waiting: deque[bytes] = deque()
        self._readiness = _Readiness()

    def inject(self, *packets: bytes) -> None:
        """Packets the host sends into the tunnel (what the kernel would route here)."""
        self._waiting.extend(packets)
        if self._waiting:
            self._readiness.readable(True)

    def block_writes(self) -> None:
        self._readiness.writable(False)

    def unblock_writes(self) -> None:
        self._readiness.writable(True)

    def fileno(self) -> int:
        return self._readiness.fileno()

    def read_queues(self) -> list:
        return [self]

    def read_packets(self, limit: int) -> list[bytes]:
        waiting = self._waiting
        packets = [waiting.popleft() for _ in range(min(limit, len(waiting)))]
        if not waiting:
            self._readiness.readable(False)
        return packets

    def coalesce(self, packets: list[bytes], partial_tcp: bool = False) -> list[tuple[list, int]]:
        if self.offload:
            return gro.coalesce(packets, partial_tcp=partial_tcp)
        if partial_tcp:
            packets = [tso.complete(packet) for packet in packets]
        return [([packet], 1) for packet in packets]

    def write_buffers(self, buffers: list) -> bool:
        if self._readiness.blocked:
            return False
        self.writes += 1
        if not self.offload:
            self.written.append(buffers[0])
        return True

    def close(self) -> None:
        self._readiness.close()
