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

`BatchSocket` puts these together for the receive and send loops of the
dataplane and the client: one receive loop with its GRO split, one send with
its GSO runs and their fallback, each datagram's fate counted.
"""

import errno
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from push_protocol.drops import DropReason

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h; Python 3.11's socket module lacks the names
UDP_GRO = 104
MAX_DATAGRAM = 65507
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
RECV_SIZE = 65536  # a GRO receive brings up to 64 KiB
# Datagrams per UDP readiness callback: with GRO one receive call brings up to ~45,
# and every packet of a callback waits for its end (the TUN write is batched), as
# does the other direction; bounding the batch in datagrams bounds that wait.
DATAGRAM_BUDGET = 64
RECEIVE_CALLS = 64  # receive calls per `BatchSocket.receive`, errors included
ERROR_REPORTS_PER_READ = 256  # bounds one read of the error queue (it refills by ICMP)
# A GSO send that fails with one of these cannot be segmented on this path (no
# checksum offload on the device, a driver without UDP GSO): one by one from then on.
NO_GSO_ERRNOS = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP})
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


def send_run(sock: socket.socket, run, address=None) -> None:
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


def _ignore_error(kind: str, error: OSError, address) -> None:
    pass


def _ignore_reports(reports: list[ErrorReport]) -> None:
    pass


class BatchSocket:
    """A non-blocking UDP socket read and written in batches where the kernel can
    (GRO, GSO), with IP_RECVERR where it has it.

    The hot loops are written inline here, once: callers get whole batches and
    see one Python call per receive or send call, not per datagram. The owner
    is told about errors on their rare paths: `on_error(kind, error, address)`
    for a receive ("udp_recv") or send ("udp_send") call the kernel refused,
    `on_reports(reports)` after ICMP error reports were read (each is counted
    by errno name in `error_reports`). `screen(data, size, source)` may claim a
    whole GRO batch (True: the owner counted it; it is not yielded).
    """

    __slots__ = (
        "_on_error",
        "_on_reports",
        "_screen",
        "error_reports",
        "gro",
        "gso",
        "send_errors",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_error: Callable[[str, OSError, object], None] = _ignore_error,
        on_reports: Callable[[list[ErrorReport]], None] = _ignore_reports,
        screen: Callable[[bytes, int, object], bool] | None = None,
        error_reports: dict[str, int] | None = None,
    ) -> None:
        self.sock = sock
        self.gro = enable_gro(sock)
        self.gso = gso_capable(sock)
        # refused sends fail loudly (ENOBUFS), not silently; ICMP errors queue up
        self.send_errors = enable_send_errors(sock)
        self.error_reports = {} if error_reports is None else error_reports
        self._on_error = on_error
        self._on_reports = on_reports
        self._screen = screen

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, budget: int, calls: int = RECEIVE_CALLS):
        """Yield (datagrams, source) for each receive call, a GRO batch split into
        its datagrams, until about `budget` datagrams (a call may bring more),
        `calls` calls, or nothing waits. The event loop calls back at once if
        more is waiting."""
        recvfrom = self.sock.recvfrom
        recvmsg = self.sock.recvmsg if self.gro else None
        screen = self._screen
        for call in range(calls):
            if budget <= 0:
                return
            try:
                if recvmsg is None:
                    data, source = recvfrom(RECV_SIZE)
                    ancdata = None
                else:  # with GRO one call may bring several datagrams of a flow
                    data, ancdata, _, source = recvmsg(RECV_SIZE, GRO_CMSG_SPACE)
            except BlockingIOError:
                if call == 0 and self.send_errors:  # woken for the error queue
                    self.read_error_reports()
                return
            except OSError as error:
                if self.send_errors and error.errno in REPORTED_ERRNOS:  # an ICMP error
                    self.read_error_reports()
                else:
                    self._on_error("udp_recv", error, None)
                continue
            if ancdata:
                size = segment_size(data, ancdata)
                if screen is not None and screen(data, size, source):
                    continue
                datagrams = segments(data, size)
            else:
                datagrams = (data,)
            budget -= len(datagrams)
            yield datagrams, source

    def send(self, datagrams: list[bytes], address, drops) -> tuple[int, int]:
        """Send `datagrams` (to `address`, or to the connected peer if None) in as
        few calls as UDP GSO allows. A datagram the kernel refuses is counted in
        `drops` under its reason. Returns (datagrams sent, where the socket was
        full): datagrams[full:] were not sent (EAGAIN), the caller queues or
        drops them; full == len(datagrams) when it took everything."""
        sent = done = 0
        for run in runs(datagrams) if self.gso else (datagrams,):
            if len(run) > 1 and self.gso:
                try:
                    self._send_run(run, address)
                    sent += len(run)
                    done += len(run)
                    continue
                except BlockingIOError:
                    return sent, done
                except OSError as error:
                    if error.errno == errno.ENOBUFS:  # the kernel dropped the run as one
                        self._on_error("udp_send", error, address)
                        drops[DropReason.NO_BUFFER_SPACE] += len(run)
                        done += len(run)
                        continue
                    if error.errno in NO_GSO_ERRNOS:
                        self.gso = False
                    # otherwise each datagram of the run meets its own fate
            for datagram in run:
                reason = self.send_datagram(datagram, address)
                if reason is DropReason.QUEUE_FULL:
                    return sent, done
                if reason is None:
                    sent += 1
                else:
                    drops[reason] += 1
                done += 1
        return sent, done

    def send_datagram(self, datagram: bytes, address, retry: bool = True) -> DropReason | None:
        """Send one datagram: None if the kernel took it, QUEUE_FULL if it cannot
        now (EAGAIN), else the reason it refused it (told to `on_error`). An error
        that only passed on an ICMP report about an earlier datagram did not stop
        this one: the reports are read and the call made once more."""
        try:
            if address is None:
                self.sock.send(datagram)
            else:
                self.sock.sendto(datagram, address)
        except BlockingIOError:
            return DropReason.QUEUE_FULL
        except OSError as error:
            if retry and self.send_errors and error.errno in REPORTED_ERRNOS:
                self.read_error_reports()
                return self.send_datagram(datagram, address, False)
            self._on_error("udp_send", error, address)
            if error.errno == errno.ENOBUFS:
                return DropReason.NO_BUFFER_SPACE
            return DropReason.SOCKET_ERROR
        return None

    def _send_run(self, run: list[bytes], address) -> None:
        """One GSO send call, raising as it does; retried once as `send_datagram`
        is after a passed-on ICMP report."""
        try:
            send_run(self.sock, run, address)
        except OSError as error:
            if not self.send_errors or error.errno not in REPORTED_ERRNOS:
                raise
            self.read_error_reports()
            send_run(self.sock, run, address)

    def read_error_reports(self) -> None:
        """Empty the socket's error queue and count its reports (ICMP errors about
        datagrams we sent: a peer that went away answers "port unreachable").
        Left there they would hold receive-buffer memory and wake the loop again."""
        reports = read_error_queue(self.sock, ERROR_REPORTS_PER_READ)
        if reports:
            counts = self.error_reports
            for report in reports:
                name = errno.errorcode.get(report.errno, "other")
                counts[name] = counts.get(name, 0) + 1
            self._on_reports(reports)
