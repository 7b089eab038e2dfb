"""Batched UDP on Linux: send many datagrams in one call (UDP GSO) and receive
many in one call (UDP GRO), with a plain fallback where the OS has neither.

Shared by the dataplane and the client. Both are optional capabilities of a
socket: `gso_capable` and `enable_gro` say whether this socket has them (Linux
4.18+/5.0+ with `sendmsg`; never on Windows), and callers keep working with
one datagram per call otherwise.

- GSO: `sendmsg` with a UDP_SEGMENT control message sends one buffer that the
  kernel cuts into datagrams of `segment` bytes (the last may be shorter). The
  datagrams on the wire are exactly those we would have sent one by one.
- GRO: with the UDP_GRO socket option the kernel may hand `recvmsg` several
  datagrams of one flow glued together, with their size in a control message;
  `split` gives back the original datagrams, so each is checked and counted on
  its own.
"""

import socket
import struct
import sys

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h; Python 3.11's socket module lacks the names
UDP_GRO = 104
MAX_DATAGRAM = 65507
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
_SEGMENT = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
GRO_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0


def gso_capable(sock: socket.socket) -> bool:
    """True if `sock` can send a UDP_SEGMENT batch (Linux with sendmsg)."""
    if not sys.platform.startswith("linux") or not hasattr(sock, "sendmsg"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives; True if the kernel agreed."""
    if not sys.platform.startswith("linux") or not hasattr(sock, "recvmsg"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def segment_size(data: bytes, ancdata: list) -> int:
    """The size of the datagrams glued in one `recvmsg` result of a GRO socket
    (the last may be shorter); len(data) when it holds one datagram."""
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _GRO_SIZE.size:
            size = _GRO_SIZE.unpack_from(value)[0]
            if 0 < size < len(data):
                return size
    return len(data)


def split(data: bytes, ancdata: list) -> list[bytes]:
    """The datagrams in one `recvmsg` result of a GRO socket."""
    return segments(data, segment_size(data, ancdata))


def segments(data: bytes, size: int) -> list[bytes]:
    """`data` cut into datagrams of `size` bytes (the last may be shorter)."""
    if size == len(data):
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def runs(datagrams: list[bytes]) -> list[list[bytes]]:
    """Cut `datagrams` (in order) into runs one GSO send can carry: equal sizes,
    except that the last may be shorter, at most MAX_SEGMENTS and MAX_DATAGRAM
    bytes in all."""
    out: list[list[bytes]] = []
    run: list[bytes] = []
    size = total = 0
    for datagram in datagrams:
        length = len(datagram)
        if (
            run
            and length <= size
            and len(run) < MAX_SEGMENTS
            and total + length <= MAX_DATAGRAM
            and len(run[-1]) == size  # nothing after a shorter one
        ):
            run.append(datagram)
            total += length
            continue
        run = [datagram]
        out.append(run)
        size = total = length
    return out


def send_run(sock: socket.socket, run: list[bytes], address=None) -> None:
    """Send one run of `runs` in one call (raises as sendmsg does)."""
    if len(run) == 1:
        if address is None:
            sock.send(run[0])
        else:
            sock.sendto(run[0], address)
        return
    control = [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(len(run[0])))]
    if address is None:
        sock.sendmsg(run, control)
    else:
        sock.sendmsg(run, control, 0, address)
