"""The dataplane's first look at a datagram, in the kernel: an eBPF socket filter.

A flood of random datagrams fills the push socket's receive buffer faster than
any user-space reader can empty it, and once it is full the kernel drops valid
datagrams with the noise (docs/performance.md). This filter runs on every
datagram before it is queued on the socket and drops what `codec.read_header`
would reject for its length, version, type or length-for-type
(docs/protocol.md, steps 1 and 3-5), and a well-formed header whose session id
(bytes 4..7) names no live session (step 6): the ids are a BPF hash map that
the registry keeps in step (`session_added` / `session_removed`, called by
dataplane/registry.py). Each drop is counted under its reason in a map that the
dataplane adds to `pushgate_dataplane_drops_total` at scrape time, so
invariants 1 and 3 hold as before: every datagram is delivered or counted under
one reason.

A GRO/GSO batch (several datagrams of one flow in one buffer; the socket has
UDP_GRO on) is dropped only when none of its datagrams can be a push packet of
a live session: each is too short, or has another version byte, an unknown
type, a wrong length for its type or an unknown session id; then each is
counted under its own reason. Otherwise (one datagram with our version, a
known type and a live session id is enough) the batch goes to user space
whole, which checks each datagram. A flood of random bytes passes in about
1 of 2^31 datagrams per live session.

If the session map cannot take an id (it holds `SESSION_MAP_ENTRIES`), the
filter is replaced by one that does not look at session ids, at once and for
good (logged): user space then counts unknown sessions, correctly but slower.

Loading needs CAP_BPF (or root); `attach` returns None where the kernel or the
process cannot, and the dataplane then counts all noise in user space as before.
No library: the program is assembled below, loaded with the bpf(2) system call
through ctypes and attached with SO_ATTACH_BPF.
"""

import contextlib
import ctypes
import logging
import os
import platform
import socket
import struct

from push_protocol.codec import PacketType
from push_protocol.constants import MIN_DATAGRAM_LEN, PROTOCOL_VERSION
from push_protocol.drops import DropReason

from .registry import RegistryObserver

log = logging.getLogger("pushgate.dataplane")

# Map slots, one counter (u64) per reason the filter can drop for.
REASONS = (
    DropReason.TOO_SHORT,
    DropReason.BAD_VERSION,
    DropReason.UNKNOWN_TYPE,
    DropReason.BAD_LENGTH,
    DropReason.UNKNOWN_SESSION,
)
_SLOT = {reason: index for index, reason in enumerate(REASONS)}
# Live session ids the map can hold: more than a /16 tunnel network's addresses.
# Allocated as ids are added (BPF_F_NO_PREALLOC); its bucket array is about 1 MiB.
SESSION_MAP_ENTRIES = 1 << 16
MAX_BATCH = 64  # UDP_MAX_SEGMENTS: the most datagrams one GRO/GSO buffer holds
UDP_HEADER = 8  # a UDP socket filter sees the datagram from its UDP header on

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
BPF_F_NO_PREALLOC = 1
BPF_PROG_TYPE_SOCKET_FILTER = 1
SO_ATTACH_BPF = 50
SO_DETACH_BPF = 27
BPF_PSEUDO_MAP_FD = 1
FUNC_MAP_LOOKUP_ELEM = 1

# struct __sk_buff fields a socket filter may read (include/uapi/linux/bpf.h)
SKB_LEN, SKB_GSO_SEGS, SKB_GSO_SIZE = 0, 164, 176

# eBPF opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_LD, _LDX, _ST, _STX, _ALU64, _JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
_W, _B, _DW = 0x00, 0x10, 0x18
_IMM, _ABS, _IND, _MEM, _ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
_ADD, _SUB, _MUL, _RSH, _MOV = 0x00, 0x10, 0x20, 0x70, 0xB0
_K, _X = 0x00, 0x08
_JA, _JEQ, _JGE, _JNE, _JLT, _JLE, _CALL, _EXIT = 0x00, 0x10, 0x30, 0x50, 0xA0, 0xB0, 0x80, 0x90
R0, R1, R2, R6, R7, R8, R9, R10 = 0, 1, 2, 6, 7, 8, 9, 10
SESSION_ID_AT = UDP_HEADER + 4  # the header's session id, network order

# The program's stack (offsets from r10)
_REASON_KEY, _SESSION_KEY, _LAST_SET_ASIDE, _PAYLOAD_LEN = -4, -8, -16, -24
# a batch's drops by reason, summed on the stack, added to the map once
_TALLY = {
    DropReason.BAD_VERSION: -32,
    DropReason.UNKNOWN_TYPE: -40,
    DropReason.BAD_LENGTH: -48,
    DropReason.UNKNOWN_SESSION: -56,
}


class Program:
    """A tiny eBPF assembler: instructions, and jumps to labels resolved at the end."""

    def __init__(self) -> None:
        self.insns: list[list[int]] = []  # [code, dst, src, off, imm]
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def jump(self, op: int, dst: int, imm: int, target: str, src: int | None = None) -> None:
        self.fixups.append((len(self.insns), target))
        if src is None:
            self.emit(_JMP | op | _K, dst, 0, 0, imm)
        else:
            self.emit(_JMP | op | _X, dst, src, 0, 0)

    def mov(self, dst: int, imm: int) -> None:
        self.emit(_ALU64 | _MOV | _K, dst, 0, 0, imm)

    def mov_reg(self, dst: int, src: int) -> None:
        self.emit(_ALU64 | _MOV | _X, dst, src)

    def alu(self, op: int, dst: int, imm: int) -> None:
        self.emit(_ALU64 | op | _K, dst, 0, 0, imm)

    def alu_reg(self, op: int, dst: int, src: int) -> None:
        self.emit(_ALU64 | op | _X, dst, src)

    def exit(self) -> None:
        """End the program; r0 is what it returns."""
        self.emit(_JMP | _EXIT)

    def load_skb_field(self, dst: int, offset: int) -> None:
        self.emit(_LDX | _MEM | _W, dst, R6, offset)

    def load_byte(self, offset: int, index: int | None = None) -> None:
        """r0 = the datagram byte at `offset` (+ register `index`); a read past the
        end ends the program with 0 (drop), so only offsets known to exist are read."""
        if index is None:
            self.emit(_LD | _ABS | _B, 0, 0, 0, offset)
        else:
            self.emit(_LD | _IND | _B, 0, index, 0, offset)

    def load_word(self, offset: int, index: int | None = None) -> None:
        """r0 = the 4 datagram bytes at `offset` (+ `index`), read in network order."""
        if index is None:
            self.emit(_LD | _ABS | _W, 0, 0, 0, offset)
        else:
            self.emit(_LD | _IND | _W, 0, index, 0, offset)

    def count(self, reason: DropReason, amount_reg: int | None, map_fd: int) -> None:
        """map[reason] += amount (a register, or 1); clobbers r0-r5."""
        self.emit(_ST | _MEM | _W, R10, 0, _REASON_KEY, _SLOT[reason])
        self.lookup(map_fd, _REASON_KEY)
        skip = f"_skip{len(self.insns)}"
        self.jump(_JEQ, R0, 0, skip)
        if amount_reg is None:
            self.mov(R1, 1)
        else:
            self.mov_reg(R1, amount_reg)
        self.emit(_STX | _ATOMIC | _DW, R0, R1, 0, _ADD)  # lock *(u64 *)r0 += r1
        self.label(skip)

    def lookup(self, map_fd: int, key_at: int) -> None:
        """r0 = map_fd's value for the key on the stack at `key_at`, or 0; clobbers r1-r5."""
        self.emit(_LD | _IMM | _DW, R1, BPF_PSEUDO_MAP_FD, 0, map_fd)
        self.emit(0, 0, 0, 0, 0)  # second half of the 64-bit immediate load
        self.mov_reg(R2, R10)
        self.alu(_ADD, R2, key_at)
        self.emit(_JMP | _CALL, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM)

    def session_is_live(self, sessions_fd: int, index: int | None = None) -> None:
        """r0 = non-zero if the session id of the datagram at `index` is in the map."""
        self.load_word(SESSION_ID_AT, index)
        self.emit(_STX | _MEM | _W, R10, R0, _SESSION_KEY)
        self.lookup(sessions_fd, _SESSION_KEY)

    def bump(self, stack_at: int) -> None:
        """*(u64 *)(r10 + stack_at) += 1; clobbers r2."""
        self.emit(_LDX | _MEM | _DW, R2, R10, stack_at)
        self.alu(_ADD, R2, 1)
        self.emit(_STX | _MEM | _DW, R10, R2, stack_at)

    def encode(self) -> bytes:
        for index, target in self.fixups:
            self.insns[index][3] = self.labels[target] - index - 1
        return b"".join(
            struct.pack("<BBhi", code, dst | src << 4, off, imm)
            for code, dst, src, off, imm in self.insns
        )


def program(map_fd: int, sessions_fd: int | None) -> bytes:
    """The filter, for the counter map `map_fd` and the live session ids `sessions_fd`
    (None: session ids are not looked at). Returns 0 (drop) or all bytes (keep)."""
    p = Program()
    version_at, type_at = UDP_HEADER, UDP_HEADER + 1
    p.mov_reg(R6, R1)  # the skb: LD_ABS/LD_IND and field loads read it through r6
    p.load_skb_field(R7, SKB_LEN)
    p.alu(_SUB, R7, UDP_HEADER)  # r7: payload bytes (of all datagrams, for a batch)
    p.load_skb_field(R8, SKB_GSO_SIZE)  # r8: datagram size in a batch, 0 for one
    p.load_skb_field(R9, SKB_GSO_SEGS)  # r9: datagrams in a batch
    p.jump(_JNE, R8, 0, "batch")

    # one datagram: read_header's checks, in its order (too_long cannot reach a socket)
    p.jump(_JLT, R7, MIN_DATAGRAM_LEN, "too_short_1")
    p.load_byte(version_at)
    p.jump(_JNE, R0, PROTOCOL_VERSION, "bad_version_1")
    p.load_byte(type_at)
    p.jump(_JEQ, R0, PacketType.DATA, "data")
    p.jump(_JEQ, R0, PacketType.KEEPALIVE, "keepalive")
    p.count(DropReason.UNKNOWN_TYPE, None, map_fd)
    p.jump(_JA, 0, 0, "drop")
    p.label("data")
    p.jump(_JEQ, R7, MIN_DATAGRAM_LEN, "bad_length_1")
    p.jump(_JA, 0, 0, "session_1")
    p.label("keepalive")
    p.jump(_JNE, R7, MIN_DATAGRAM_LEN, "bad_length_1")
    p.label("session_1")
    if sessions_fd is not None:  # then the registry's lookup, step 6
        p.session_is_live(sessions_fd)
        p.jump(_JEQ, R0, 0, "unknown_session_1")
    p.jump(_JA, 0, 0, "keep")

    # a batch of r9 datagrams of r8 bytes (the last may be shorter)
    p.label("batch")
    p.jump(_JEQ, R9, 0, "keep")  # a batch that does not say its count: user space looks
    p.jump(_JLT, R8, MIN_DATAGRAM_LEN, "too_short_all")  # the last is no longer
    p.jump(_JGE, R9, MAX_BATCH + 1, "keep")  # more than the kernel makes: user space looks
    p.emit(_STX | _MEM | _DW, R10, R7, _PAYLOAD_LEN)
    # A short last datagram is too_short whatever its bytes (and may have fewer than
    # two to read): set it aside, r9 = the datagrams whose bytes are looked at.
    p.mov_reg(R1, R9)
    p.alu(_SUB, R1, 1)
    p.alu_reg(_MUL, R1, R8)
    p.alu_reg(_SUB, R7, R1)  # r7: the last datagram's length
    p.mov(R1, 0)
    p.jump(_JGE, R7, MIN_DATAGRAM_LEN, "last_counted")
    p.alu(_SUB, R9, 1)
    p.mov(R1, 1)
    p.label("last_counted")
    p.emit(_STX | _MEM | _DW, R10, R1, _LAST_SET_ASIDE)
    # first pass: any datagram with our version, a known type (and a live session
    # id) -> user space, whole
    p.mov(R7, 0)  # r7 walks the batch: the offset of datagram i
    for index in range(MAX_BATCH):
        p.jump(_JLE, R9, index, "all_bad")
        p.load_byte(version_at, index=R7)
        p.jump(_JNE, R0, PROTOCOL_VERSION, f"next{index}")
        p.load_byte(type_at, index=R7)
        if sessions_fd is None:
            p.jump(_JEQ, R0, PacketType.DATA, "keep")
            p.jump(_JEQ, R0, PacketType.KEEPALIVE, "keep")
        else:
            p.jump(_JEQ, R0, PacketType.DATA, f"session{index}")
            p.jump(_JNE, R0, PacketType.KEEPALIVE, f"next{index}")
            p.label(f"session{index}")
            p.session_is_live(sessions_fd, index=R7)
            p.jump(_JNE, R0, 0, "keep")
        p.label(f"next{index}")
        p.alu_reg(_ADD, R7, R8)
    # second pass: none can be a push packet of a live session; tally each under
    # read_header's reason, or unknown_session, then add the tallies to the map
    p.label("all_bad")
    for stack_at in _TALLY.values():
        p.emit(_ST | _MEM | _DW, R10, 0, stack_at, 0)
    # r9 again from the skb, so that the verifier, which knows r9 exactly on each of
    # the first pass's 64 ways here, walks the second pass once rather than 64 times
    p.load_skb_field(R9, SKB_GSO_SEGS)
    p.emit(_LDX | _MEM | _DW, R1, R10, _LAST_SET_ASIDE)
    p.alu_reg(_SUB, R9, R1)
    p.mov(R7, 0)
    for index in range(MAX_BATCH):
        p.jump(_JLE, R9, index, "tally")
        p.load_byte(version_at, index=R7)
        p.jump(_JNE, R0, PROTOCOL_VERSION, f"bad_version{index}")
        p.load_byte(type_at, index=R7)
        p.emit(_LDX | _MEM | _DW, R1, R10, _PAYLOAD_LEN)  # r1: this datagram's length,
        p.alu_reg(_SUB, R1, R7)  # the bytes left from it, at most r8
        p.jump(_JLE, R1, 0, f"length{index}", src=R8)
        p.mov_reg(R1, R8)
        p.label(f"length{index}")
        p.jump(_JEQ, R0, PacketType.DATA, f"data{index}")
        p.jump(_JEQ, R0, PacketType.KEEPALIVE, f"keepalive{index}")
        p.bump(_TALLY[DropReason.UNKNOWN_TYPE])
        p.jump(_JA, 0, 0, f"counted{index}")
        p.label(f"data{index}")
        p.jump(_JEQ, R1, MIN_DATAGRAM_LEN, f"bad_length{index}")
        p.jump(_JA, 0, 0, f"unknown_session{index}")
        p.label(f"keepalive{index}")
        p.jump(_JNE, R1, MIN_DATAGRAM_LEN, f"bad_length{index}")
        p.label(f"unknown_session{index}")  # well-formed, so its session is unknown
        p.bump(_TALLY[DropReason.UNKNOWN_SESSION])
        p.jump(_JA, 0, 0, f"counted{index}")
        p.label(f"bad_length{index}")
        p.bump(_TALLY[DropReason.BAD_LENGTH])
        p.jump(_JA, 0, 0, f"counted{index}")
        p.label(f"bad_version{index}")
        p.bump(_TALLY[DropReason.BAD_VERSION])
        p.label(f"counted{index}")
        p.alu_reg(_ADD, R7, R8)
    p.label("tally")
    for reason, stack_at in _TALLY.items():  # (no test for 0: the verifier would
        p.emit(_LDX | _MEM | _DW, R7, R10, stack_at)  # track every tally, path by path)
        p.count(reason, R7, map_fd)
    p.emit(_LDX | _MEM | _DW, R1, R10, _LAST_SET_ASIDE)
    p.jump(_JEQ, R1, 0, "drop")
    p.count(DropReason.TOO_SHORT, None, map_fd)
    p.jump(_JA, 0, 0, "drop")
    p.label("too_short_all")
    p.count(DropReason.TOO_SHORT, R9, map_fd)
    p.jump(_JA, 0, 0, "drop")

    single_drops = [
        ("too_short_1", DropReason.TOO_SHORT),
        ("bad_version_1", DropReason.BAD_VERSION),
        ("bad_length_1", DropReason.BAD_LENGTH),
    ]
    if sessions_fd is not None:  # (the verifier refuses code no jump reaches)
        single_drops.append(("unknown_session_1", DropReason.UNKNOWN_SESSION))
    for name, reason in single_drops:
        p.label(name)
        p.count(reason, None, map_fd)
        p.jump(_JA, 0, 0, "drop")
    p.label("drop")
    p.mov(R0, 0)
    p.exit()
    p.label("keep")
    p.emit(0x04 | _MOV | _K, R0, 0, 0, -1)  # 32-bit move: 0xffffffff, keep every byte
    p.exit()
    return p.encode()


class SocketFilter(RegistryObserver):
    """The filter attached to one socket, its drop counts by reason, and the live
    session ids it lets through (an observer of dataplane/registry.py's Registry)."""

    def __init__(self, sock: socket.socket, map_fd: int, sessions_fd: int, prog_fd: int) -> None:
        self._sock = sock
        self._map_fd = map_fd
        self._sessions_fd: int | None = sessions_fd
        self._prog_fd = prog_fd

    @property
    def checks_sessions(self) -> bool:
        """Whether unknown session ids are dropped in the kernel."""
        return self._sessions_fd is not None

    def drops(self) -> dict[DropReason, int]:
        """Datagrams dropped in the kernel so far, by reason (read at scrape time)."""
        counts = {}
        key = ctypes.c_uint32()
        value = ctypes.c_uint64()
        for reason, slot in _SLOT.items():
            key.value = slot
            _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(self._map_fd, key, value))
            counts[reason] = value.value
        return counts

    def session_added(self, session_id: int) -> None:
        if self._sessions_fd is None:
            return
        key, live = ctypes.c_uint32(session_id), ctypes.c_uint8(1)
        try:
            _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(self._sessions_fd, key, live))
        except OSError as error:
            # The kernel would drop this session's packets: stop looking at ids at all.
            self._stop_checking_sessions(f"cannot add session {session_id:#010x}: {error}")

    def session_removed(self, session_id: int) -> None:
        if self._sessions_fd is None:
            return
        # An id that stays (it was not there, or the kernel refused) only lets its
        # datagrams reach user space, which drops them as unknown_session.
        key = ctypes.c_uint32(session_id)
        with contextlib.suppress(OSError):
            _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(self._sessions_fd, key, None))

    def _stop_checking_sessions(self, why: str) -> None:
        """Replace the program by one that passes every well-formed header (the
        counts stay in the same map); without a program, detach: user space then
        judges every datagram, as without the filter."""
        try:
            prog_fd = load_program(program(self._map_fd, None))
            self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
            outcome = "unknown session ids are now dropped in user space"
        except (FilterUnavailable, OSError) as error:
            prog_fd = None
            self._sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_BPF, 0)
            outcome = f"filter detached ({error}): every datagram is judged in user space"
        log.warning("kernel socket filter: %s; %s", why, outcome)
        os.close(self._prog_fd)
        os.close(self._sessions_fd)
        self._sessions_fd = None
        self._prog_fd = prog_fd

    def close(self) -> None:
        for fd in (self._prog_fd, self._sessions_fd, self._map_fd):
            if fd is not None:
                os.close(fd)


class FilterUnavailable(Exception):
    pass


def attach(sock: socket.socket) -> SocketFilter:
    """Load the filter and attach it to `sock`; raises FilterUnavailable saying why not.
    No session id is live until `session_added` says so."""
    if _SYS_BPF is None:
        raise FilterUnavailable(f"no bpf(2) system call number for {platform.machine()}")
    fds = []
    try:
        try:
            fds.append(_create_map(BPF_MAP_TYPE_ARRAY, 4, 8, len(REASONS), 0))
            fds.append(_create_map(BPF_MAP_TYPE_HASH, 4, 1, SESSION_MAP_ENTRIES, BPF_F_NO_PREALLOC))
        except OSError as error:
            raise FilterUnavailable(f"cannot create a BPF map: {error.strerror}") from None
        map_fd, sessions_fd = fds
        fds.append(load_program(program(map_fd, sessions_fd)))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, fds[-1])
        except OSError as error:
            raise FilterUnavailable(f"cannot attach the filter: {error.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return SocketFilter(sock, map_fd, sessions_fd, fds[-1])


def _create_map(kind: int, key_size: int, value_size: int, entries: int, flags: int) -> int:
    return _bpf(BPF_MAP_CREATE, struct.pack("=IIIII", kind, key_size, value_size, entries, flags))


def _elem_attr(map_fd: int, key, value) -> bytes:
    """bpf(2)'s attr for a map element command; the ctypes objects must outlive the call."""
    value_at = ctypes.addressof(value) if value is not None else 0
    return struct.pack("=IIQQQ", map_fd, 0, ctypes.addressof(key), value_at, 0)


def load_program(code: bytes) -> int:
    """Load a socket filter program (the kind a TUN's steering program is too);
    its descriptor, or FilterUnavailable with the verifier's last word."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)

    def attr(log_level: int) -> bytes:
        return struct.pack(
            "=IIQQIIQ",
            BPF_PROG_TYPE_SOCKET_FILTER,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            log_level,
            len(log) if log_level else 0,
            ctypes.addressof(log) if log_level else 0,
        )

    try:
        return _bpf(BPF_PROG_LOAD, attr(0))
    except OSError as error:
        with contextlib.suppress(OSError):  # again, with the verifier's log, to say why
            _bpf(BPF_PROG_LOAD, attr(1))
        lines = log.value.decode(errors="replace").strip().splitlines()
        detail = f" ({lines[-1]})" if lines else ""
        raise FilterUnavailable(
            f"the kernel refused the filter: {error.strerror}{detail}"
        ) from None


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(command: int, attr: bytes) -> int:
    buffer = ctypes.create_string_buffer(attr, max(len(attr), 128))
    result = _libc.syscall(_SYS_BPF, command, buffer, len(buffer))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result
