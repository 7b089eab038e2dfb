"""The dataplane's first look at a datagram, in the kernel: an eBPF socket filter.

A flood of random datagrams fills the push socket's receive buffer faster than
any user-space reader can empty it, and once it is full the kernel drops valid
datagrams with the noise (docs/performance.md). This filter runs on every
datagram before it is queued on the socket and drops what `codec.read_header`
would reject for its length, version, type or length-for-type
(docs/protocol.md, steps 1 and 3-5), counting each drop under its reason in a
map that the dataplane adds to `pushgate_dataplane_drops_total` at scrape time,
so invariants 1 and 3 hold as before: every datagram is delivered or counted
under one reason.

A GRO/GSO batch (several datagrams of one flow in one buffer; the socket has
UDP_GRO on) is dropped only when none of its datagrams can be a push packet:
each is too short, or has another version byte or an unknown type; then each
is counted under its own reason. Otherwise (one datagram with our version and
a known type is enough) the batch goes to user space whole, which checks each
datagram. A flood of random bytes passes in about 2 of 65536 datagrams.

Loading needs CAP_BPF (or root); `attach` returns None where the kernel or the
process cannot, and the dataplane then counts all noise in user space as before.
No library: the program is assembled below, loaded with the bpf(2) system call
through ctypes and attached with SO_ATTACH_BPF.
"""

import contextlib
import ctypes
import os
import platform
import socket
import struct

from push_protocol.codec import PacketType
from push_protocol.constants import MIN_DATAGRAM_LEN, PROTOCOL_VERSION
from push_protocol.drops import DropReason

# Map slots, one counter (u64) per reason the filter can drop for.
REASONS = (
    DropReason.TOO_SHORT,
    DropReason.BAD_VERSION,
    DropReason.UNKNOWN_TYPE,
    DropReason.BAD_LENGTH,
)
_SLOT = {reason: index for index, reason in enumerate(REASONS)}
MAX_BATCH = 64  # UDP_MAX_SEGMENTS: the most datagrams one GRO/GSO buffer holds
UDP_HEADER = 8  # a UDP socket filter sees the datagram from its UDP header on

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_PROG_LOAD = 0, 1, 5
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_SOCKET_FILTER = 1
SO_ATTACH_BPF = 50
BPF_PSEUDO_MAP_FD = 1
FUNC_MAP_LOOKUP_ELEM = 1

# struct __sk_buff fields a socket filter may read (include/uapi/linux/bpf.h)
SKB_LEN, SKB_GSO_SEGS, SKB_GSO_SIZE = 0, 164, 176

# eBPF opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_LD, _LDX, _ST, _STX, _ALU64, _JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
_W, _B, _DW = 0x00, 0x10, 0x18
_IMM, _ABS, _IND, _MEM, _ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
_ADD, _SUB, _MUL, _MOV = 0x00, 0x10, 0x20, 0xB0
_K, _X = 0x00, 0x08
_JA, _JEQ, _JGE, _JNE, _JLT, _JLE, _CALL, _EXIT = 0x00, 0x10, 0x30, 0x50, 0xA0, 0xB0, 0x80, 0x90
R0, R1, R2, R6, R7, R8, R9, R10 = 0, 1, 2, 6, 7, 8, 9, 10


class _Program:
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

    def load_skb_field(self, dst: int, offset: int) -> None:
        self.emit(_LDX | _MEM | _W, dst, R6, offset)

    def load_byte(self, offset: int, index: int | None = None) -> None:
        """r0 = the datagram byte at `offset` (+ register `index`); a read past the
        end ends the program with 0 (drop), so only offsets known to exist are read."""
        if index is None:
            self.emit(_LD | _ABS | _B, 0, 0, 0, offset)
        else:
            self.emit(_LD | _IND | _B, 0, index, 0, offset)

    def count(self, reason: DropReason, amount_reg: int | None, map_fd: int) -> None:
        """map[reason] += amount (a register, or 1); clobbers r0-r5."""
        self.emit(_ST | _MEM | _W, R10, 0, -4, _SLOT[reason])
        self.emit(_LD | _IMM | _DW, R1, BPF_PSEUDO_MAP_FD, 0, map_fd)
        self.emit(0, 0, 0, 0, 0)  # second half of the 64-bit immediate load
        self.mov_reg(R2, R10)
        self.alu(_ADD, R2, -4)
        self.emit(_JMP | _CALL, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM)
        skip = f"_skip{len(self.insns)}"
        self.jump(_JEQ, R0, 0, skip)
        if amount_reg is None:
            self.mov(R1, 1)
        else:
            self.mov_reg(R1, amount_reg)
        self.emit(_STX | _ATOMIC | _DW, R0, R1, 0, _ADD)  # lock *(u64 *)r0 += r1
        self.label(skip)

    def encode(self) -> bytes:
        for index, target in self.fixups:
            self.insns[index][3] = self.labels[target] - index - 1
        return b"".join(
            struct.pack("<BBhi", code, dst | src << 4, off, imm)
            for code, dst, src, off, imm in self.insns
        )


def program(map_fd: int) -> bytes:
    """The filter, for the counter map `map_fd`. Returns 0 (drop) or all bytes (keep)."""
    p = _Program()
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
    p.jump(_JA, 0, 0, "keep")
    p.label("keepalive")
    p.jump(_JNE, R7, MIN_DATAGRAM_LEN, "bad_length_1")
    p.jump(_JA, 0, 0, "keep")

    # a batch of r9 datagrams of r8 bytes (the last may be shorter)
    p.label("batch")
    p.jump(_JEQ, R9, 0, "keep")  # a batch that does not say its count: user space looks
    p.jump(_JLT, R8, MIN_DATAGRAM_LEN, "too_short_all")  # the last is no longer
    p.jump(_JGE, R9, MAX_BATCH + 1, "keep")  # more than the kernel makes: user space looks
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
    p.emit(_STX | _MEM | _DW, R10, R1, -16)  # 1 if the last is set aside as too_short
    # first pass: any datagram with our version and a known type -> user space, whole
    p.mov(R7, 0)  # r7 walks the batch: the offset of datagram i
    for index in range(MAX_BATCH):
        p.jump(_JLE, R9, index, "all_bad")
        p.load_byte(version_at, index=R7)
        p.jump(_JNE, R0, PROTOCOL_VERSION, f"next{index}")
        p.load_byte(type_at, index=R7)
        p.jump(_JEQ, R0, PacketType.DATA, "keep")
        p.jump(_JEQ, R0, PacketType.KEEPALIVE, "keep")
        p.label(f"next{index}")
        p.alu_reg(_ADD, R7, R8)
    # second pass: none can be a push packet; count each under read_header's reason
    p.label("all_bad")
    p.mov(R7, 0)
    for index in range(MAX_BATCH):
        p.jump(_JLE, R9, index, "tally_last")
        p.load_byte(version_at, index=R7)
        p.jump(_JNE, R0, PROTOCOL_VERSION, f"bad_version{index}")
        p.count(DropReason.UNKNOWN_TYPE, None, map_fd)
        p.jump(_JA, 0, 0, f"counted{index}")
        p.label(f"bad_version{index}")
        p.count(DropReason.BAD_VERSION, None, map_fd)
        p.label(f"counted{index}")
        p.alu_reg(_ADD, R7, R8)
    p.label("tally_last")
    p.emit(_LDX | _MEM | _DW, R1, R10, -16)
    p.jump(_JEQ, R1, 0, "drop")
    p.count(DropReason.TOO_SHORT, None, map_fd)
    p.jump(_JA, 0, 0, "drop")
    p.label("too_short_all")
    p.count(DropReason.TOO_SHORT, R9, map_fd)
    p.jump(_JA, 0, 0, "drop")

    for name, reason in (
        ("too_short_1", DropReason.TOO_SHORT),
        ("bad_version_1", DropReason.BAD_VERSION),
        ("bad_length_1", DropReason.BAD_LENGTH),
    ):
        p.label(name)
        p.count(reason, None, map_fd)
        p.jump(_JA, 0, 0, "drop")
    p.label("drop")
    p.mov(R0, 0)
    p.emit(_JMP | _EXIT)
    p.label("keep")
    p.emit(0x04 | _MOV | _K, R0, 0, 0, -1)  # 32-bit move: 0xffffffff, keep every byte
    p.emit(_JMP | _EXIT)
    return p.encode()


class SocketFilter:
    """The filter attached to one socket, and its drop counts by reason."""

    def __init__(self, map_fd: int, prog_fd: int) -> None:
        self._map_fd = map_fd
        self._prog_fd = prog_fd

    def drops(self) -> dict[DropReason, int]:
        """Datagrams dropped in the kernel so far, by reason (read at scrape time)."""
        counts = {}
        key = ctypes.c_uint32()
        value = ctypes.c_uint64()
        for reason, slot in _SLOT.items():
            key.value = slot
            attr = struct.pack(
                "=IIQQQ", self._map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0
            )
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
            counts[reason] = value.value
        return counts

    def close(self) -> None:
        for fd in (self._prog_fd, self._map_fd):
            os.close(fd)


class FilterUnavailable(Exception):
    pass


def attach(sock: socket.socket) -> SocketFilter:
    """Load the filter and attach it to `sock`; raises FilterUnavailable saying why not."""
    if _SYS_BPF is None:
        raise FilterUnavailable(f"no bpf(2) system call number for {platform.machine()}")
    try:
        map_fd = _bpf(BPF_MAP_CREATE, struct.pack("=IIIII", BPF_MAP_TYPE_ARRAY, 4, 8, 4, 0))
    except OSError as error:
        raise FilterUnavailable(f"cannot create a BPF map: {error.strerror}") from None
    try:
        prog_fd = _load(program(map_fd))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
        except OSError as error:
            os.close(prog_fd)
            raise FilterUnavailable(f"cannot attach the filter: {error.strerror}") from None
    except BaseException:
        os.close(map_fd)
        raise
    return SocketFilter(map_fd, prog_fd)


def _load(code: bytes) -> int:
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
