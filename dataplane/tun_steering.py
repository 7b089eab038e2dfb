"""Which queue of the dataplane's multi-queue TUN a packet for a client waits in:
the one its destination address picks (an eBPF program the kernel runs for each
packet it routes to the device, TUNSETSTEERINGEBPF, Linux 4.16+).

Why: a TUN with one queue is one FIFO for every client. When packets for
clients come faster than the dataplane reads them, the kernel drops at that
ring whoever's they are, and what the dataplane reads is in arrival order, so
a flood to one client takes the reads (one `read()` per packet of a UDP flood)
and the ring's room from every other (docs/performance.md, "Fair send
queue and a multi-queue TUN"). With a queue per group of addresses, a flood
fills its own queue's ring and the kernel drops its excess there, before the
dataplane spends a read on it, while the loop reads the queues in turn (a
reader each, Device.on_tun_readable). The queue is the address modulo the number of queues,
so consecutive addresses of the pool land in different queues; sessions whose
addresses share a queue share its ring, as flows share a bucket in SFQ.
"""

import fcntl
import os
import struct

from .socket_filter import _JEQ, _RSH, R0, R1, R6, Program, load_program

QUEUES = 8  # the dataplane's TUN queues
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
IPV4_DESTINATION_AT = 16
IPV6_DESTINATION_LAST_WORD_AT = 36  # the last 4 of its 16 bytes: what tells pool addresses apart


def program() -> bytes:
    """Returns the packet's destination address (IPv4), or its last 32 bits (IPv6),
    as a number; the kernel takes it modulo the number of queues. A packet too
    short to hold it ends the program with 0: the first queue."""
    p = Program()
    p.mov_reg(R6, R1)  # the skb: LD_ABS reads it through r6
    p.load_byte(0)
    p.alu(_RSH, R0, 4)  # the IP version
    p.jump(_JEQ, R0, 6, "ipv6")
    p.load_word(IPV4_DESTINATION_AT)
    p.exit()
    p.label("ipv6")
    p.load_word(IPV6_DESTINATION_LAST_WORD_AT)
    p.exit()
    return p.encode()


def queue_of(address: bytes, queues: int) -> int:
    """The queue `program` picks for packets to `address` (4 or 16 bytes): the kernel
    keeps the low 16 bits of what it returns and takes them modulo `queues`."""
    return (int.from_bytes(address[-4:], "big") & 0xFFFF) % queues


def attach(tun_fd: int) -> None:
    """Load the program and make it the TUN's steering program; FilterUnavailable
    (the kernel refused the program) or OSError (the ioctl) say why not."""
    prog_fd = load_program(program())
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))
    finally:
        os.close(prog_fd)  # the device holds its own reference
