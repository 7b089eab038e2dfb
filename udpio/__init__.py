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
- Send errors: with IP_RECVERR (IPV6_RECVERR) a send the kernel cannot queue for
  transmission fails with ENOBUFS instead of "succeeding" (it is counted only in
  /proc/net/snmp's SndbufErrors otherwise), and ICMP errors about datagrams we
  sent are queued on the socket's error queue, which `read_error_queue` empties.
"""

import errno
import socket
import struct
import sys
from dataclasses import dataclass

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h; Python 3.11's socket module lacks the names
UDP_GRO = 104
MAX_DATAGRAM = 65507
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
_SEGMENT = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
GRO_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0
SOL_IP, SOL_IPV6 = 0, 41
IP_RECVERR = 11  # linux/in.h
IPV6_RECVERR = 25  # linux/in6.h
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err (linux/errqueue.h)
_RECVERR_CMSGS = ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR))
_ORIGINS = {1: "local", 2: "icmp", 3: "icmp6"}  # SO_EE_ORIGIN_*
# a sock_extended_err and the offender's address (at most a sockaddr_in6)
_ERRQUEUE_CMSG_SPACE = (
    socket.CMSG_SPACE(_EXTENDED_ERR.size + 28) if hasattr(socket, "CMSG_SPACE") else 0
)
# What sk_err, the socket's pending error, can hold under IP_RECVERR: the errno of
# an ICMP error about an earlier datagram (or of a local report). The next
# send or receive call on the socket fails with it once, having done nothing.
REPORTED_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EPROTO,
        errno.EMSGSIZE,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EACCES,
    }
)


@dataclass(frozen=True)
class ErrorReport:
    """One entry of a socket's error queue: an errno about a datagram we sent."""

    errno: int
    origin: str  # "icmp", "icmp6", "local" or "other"
    destination: tuple  # where that datagram went


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


def enable_send_errors(sock: socket.socket) -> bool:
    """Ask the kernel to report send errors (IP_RECVERR, and IPV6_RECVERR on an IPv6
    socket): a datagram it cannot queue for transmission fails with ENOBUFS rather
    than being dropped silently, and ICMP errors go to the error queue (read them
    with `read_error_queue`). True if it agreed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)  # on IPv6 too: IPv4-mapped destinations
    except OSError:
        return False
    return True


def read_error_queue(sock: socket.socket, limit: int) -> list[ErrorReport]:
    """Take up to `limit` reports off the socket's error queue (MSG_ERRQUEUE); [] if
    it is empty. Emptying it also clears the socket's pending error."""
    reports: list[ErrorReport] = []
    while len(reports) < limit:
        try:
            _, ancdata, _, destination = sock.recvmsg(0, _ERRQUEUE_CMSG_SPACE, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            break
        number, origin = 0, 0  # (an entry without its report is still one entry)
        for level, kind, value in ancdata:
            if (level, kind) in _RECVERR_CMSGS and len(value) >= _EXTENDED_ERR.size:
                number, origin = _EXTENDED_ERR.unpack_from(value)[:2]
        reports.append(ErrorReport(number, _ORIGINS.get(origin, "other"), destination))
    return reports


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
