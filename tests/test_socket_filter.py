"""The dataplane's eBPF socket filter (dataplane/socket_filter.py) on a real UDP
socket with UDP_GRO, as the dataplane's: it drops what `read_header` rejects,
counts each under read_header's reason, and passes everything else untouched;
a GSO batch is dropped only when none of its datagrams can be a push packet."""

import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

import udpio
from dataplane.metrics import KernelDrops
from dataplane.socket_filter import FilterUnavailable, attach
from push_protocol.codec import Header, read_header
from push_protocol.constants import MIN_DATAGRAM_LEN


@pytest.fixture
def filtered():
    """(receiving socket with the filter and GRO, its filter, a connected sender)."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(("127.0.0.1", 0))
    assert udpio.enable_gro(receiver)
    try:
        socket_filter = attach(receiver)
    except FilterUnavailable as why:
        pytest.fail(f"the filter must load here (root, Linux): {why}")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    yield receiver, socket_filter, sender
    socket_filter.close()
    receiver.close()
    sender.close()


def _received(receiver: socket.socket) -> list[bytes]:
    """Every datagram waiting on the socket, GRO batches cut back into datagrams."""
    time.sleep(0.2)
    receiver.setblocking(False)
    datagrams = []
    while True:
        try:
            data, ancdata, _, _ = receiver.recvmsg(65536, udpio.GRO_CMSG_SPACE)
        except BlockingIOError:
            return datagrams
        datagrams.extend(udpio.split(data, ancdata))


def _send_batch(sender: socket.socket, datagrams: list[bytes]) -> None:
    """One GSO send: the receiving socket sees one buffer of all of them."""
    udpio.send_run(sender, datagrams)


def test_single_datagrams_are_judged_as_read_header_judges_them(filtered):
    receiver, socket_filter, sender = filtered
    rng = random.Random(7)
    datagrams = [
        b"",
        b"\x01" * (MIN_DATAGRAM_LEN - 1),
        b"\x02\x01" + bytes(40),
        b"\x00\x01" + bytes(40),
        b"\x01\x00" + bytes(40),
        b"\x01\x03" + bytes(40),
        b"\x01\x01" + bytes(MIN_DATAGRAM_LEN - 2),  # data without payload
        b"\x01\x02" + bytes(MIN_DATAGRAM_LEN - 1),  # keepalive with payload
        b"\x01\x02" + bytes(MIN_DATAGRAM_LEN - 2),  # a well-formed keepalive
        b"\x01\x01" + os.urandom(1400),  # well-formed data (its tag is user space's job)
    ]
    for _ in range(300):
        head = bytes([rng.choice([0, 1, 1, 2]), rng.choice([0, 1, 2, 3])])
        datagrams.append(head + os.urandom(rng.choice([0, 10, 30, 31, 32, 100, 1400])))
    for datagram in datagrams:
        sender.send(datagram)
    verdicts = [read_header(d) for d in datagrams]
    assert _received(receiver) == [
        d for d, v in zip(datagrams, verdicts, strict=True) if type(v) is Header
    ]
    expected = Counter(v for v in verdicts if type(v) is not Header)
    assert {r: n for r, n in socket_filter.drops().items() if n} == dict(expected)


def test_a_batch_of_noise_is_dropped_and_each_datagram_counted(filtered):
    receiver, socket_filter, sender = filtered
    noise = [b"\x07" + os.urandom(99) for _ in range(64)]  # none has our version byte
    _send_batch(sender, noise)
    short = [os.urandom(20) for _ in range(10)]  # all too short
    _send_batch(sender, short)
    short_last = [b"\x00" + os.urandom(99) for _ in range(5)] + [b"\x01"]
    _send_batch(sender, short_last)
    # our version byte, but no known type: unknown_type, each beside the bad versions
    mixed = [bytes([1 if i % 3 else 9, 7 + i % 2]) + os.urandom(98) for i in range(30)]
    _send_batch(sender, mixed)
    assert _received(receiver) == []
    expected = Counter(read_header(d) for d in noise + short + short_last + mixed)
    assert {r: n for r, n in socket_filter.drops().items() if n} == dict(expected)
    assert len(expected) == 3  # too_short, bad_version, unknown_type


def test_a_batch_with_one_possible_push_packet_reaches_user_space_whole(filtered):
    receiver, socket_filter, sender = filtered
    for known_type in (1, 2):
        batch = [b"\x01\x07" + os.urandom(98) for _ in range(40)]
        batch[33] = bytes([1, known_type]) + os.urandom(98)
        _send_batch(sender, batch)
        assert _received(receiver) == batch  # user space counts each of them
    assert sum(socket_filter.drops().values()) == 0


def test_kernel_drops_do_not_count_the_filters_drops_twice(filtered):
    """The socket's own drop counter (/proc/net/udp) includes what the filter
    dropped; the exported receive-buffer drops must not."""
    receiver, socket_filter, sender = filtered
    for _ in range(50):
        sender.send(b"\x07" * 40)
    assert _received(receiver) == []
    assert socket_filter.drops()[read_header(b"\x07" * 40)] == 50
    raw = KernelDrops(receiver, "pg-no-such-tun")()["udp_receive_buffer"]
    exported = KernelDrops(receiver, "pg-no-such-tun", filter_drops=socket_filter.drops)()
    assert (raw, exported["udp_receive_buffer"]) == (50, 0)


def test_without_cap_bpf_it_says_why():
    """In a process with no capabilities at all (root's uid, empty bounding set),
    attach refuses with the kernel's reason."""
    code = (
        "import socket\n"
        "from dataplane.socket_filter import FilterUnavailable, attach\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        "    attach(s)\n"
        "except FilterUnavailable as why:\n"
        "    print(why)\n"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cannot create a BPF map: Operation not permitted"), (
        result.stdout
    )
