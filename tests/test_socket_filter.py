"""The dataplane's eBPF socket filter (dataplane/socket_filter.py) on a real UDP
socket with UDP_GRO, as the dataplane's: it drops what `read_header` rejects and
well-formed headers of no live session, counts each under its reason, and passes
everything else untouched; a GSO batch is dropped only when none of its
datagrams can be a push packet of a live session. The live ids follow a real
Registry."""

import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest

from dataplane.metrics import KernelDrops
from dataplane.registry import Registry, SessionRecord
from dataplane.socket_filter import SESSION_MAP_ENTRIES, FilterUnavailable, attach
from push_protocol.aead import CipherSuite
from push_protocol.codec import Header, read_header
from push_protocol.constants import MIN_DATAGRAM_LEN
from push_protocol.drops import DropReason
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd
from push_protocol.session import TunnelSession
from pushgate_io import udp

LIVE = (0x01020304, 0xFFFFFFFF, 7)  # session ids the registry holds in most tests


def _record(session_id: int) -> SessionRecord:
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
    tunnel = TunnelSession(session_id, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    return SessionRecord(tunnel, (), 0.0)


@pytest.fixture
def registry():
    registry = Registry()
    for session_id in LIVE:
        registry.add(_record(session_id))
    return registry


@pytest.fixture
def filtered(registry):
    """(receiving socket with the filter and GRO, its filter, a connected sender);
    the filter observes `registry`."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(("127.0.0.1", 0))
    assert udp.enable_gro(receiver)
    try:
        socket_filter = attach(receiver)
    except FilterUnavailable as why:
        pytest.fail(f"the filter must load here (root, Linux): {why}")
    registry.observe(socket_filter)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    yield receiver, socket_filter, sender
    socket_filter.close()
    receiver.close()
    sender.close()


def _verdict(datagram: bytes, live) -> DropReason | None:
    """What the dataplane does with a datagram before any crypto: read_header's
    reason, unknown_session, or None (it goes on to the session)."""
    header = read_header(datagram)
    if type(header) is not Header:
        return header
    return None if header.session_id in live else DropReason.UNKNOWN_SESSION


def _packet(kind: int, session_id: int, length: int) -> bytes:
    """A datagram with a well-formed header for `session_id` and random bytes."""
    return struct.pack("!BBHI", 1, kind, 0, session_id) + os.urandom(length - 8)


def _nonzero(drops: dict) -> dict:
    return {reason: count for reason, count in drops.items() if count}


def _received(receiver: socket.socket) -> list[bytes]:
    """Every datagram waiting on the socket, GRO batches cut back into datagrams."""
    time.sleep(0.2)
    receiver.setblocking(False)
    datagrams = []
    while True:
        try:
            data, ancdata, _, _ = receiver.recvmsg(65536, udp.GRO_CMSG_SPACE)
        except BlockingIOError:
            return datagrams
        datagrams.extend(udp.split(data, ancdata))


def _send_batch(sender: socket.socket, datagrams: list[bytes]) -> None:
    """One GSO send: the receiving socket sees one buffer of all of them."""
    udp.send_run(sender, datagrams)


@pytest.mark.netns
def test_single_datagrams_are_judged_as_the_dataplane_judges_them(filtered):
    receiver, socket_filter, sender = filtered
    rng = random.Random(7)
    datagrams = [
        b"",
        b"\x01" * (MIN_DATAGRAM_LEN - 1),
        b"\x02\x01" + bytes(40),
        b"\x00\x01" + bytes(40),
        b"\x01\x00" + bytes(40),
        b"\x01\x03" + bytes(40),
        _packet(1, LIVE[0], MIN_DATAGRAM_LEN),  # data without payload
        _packet(2, LIVE[0], MIN_DATAGRAM_LEN + 1),  # keepalive with payload
        _packet(2, LIVE[0], MIN_DATAGRAM_LEN),  # a well-formed keepalive
        _packet(1, LIVE[1], 1400),  # well-formed data (its tag is user space's job)
        _packet(2, 0x01020305, MIN_DATAGRAM_LEN),  # one id off a live one
        _packet(1, 0, 1400),
        _packet(1, 7 << 24, 100),  # a live id in the other byte order
    ]
    for _ in range(300):
        head = bytes([rng.choice([0, 1, 1, 2]), rng.choice([0, 1, 2, 3]), 0, 0])
        session_id = rng.choice([*LIVE, rng.getrandbits(32)])
        length = rng.choice([0, 10, 30, 31, 32, 100, 1400])
        datagrams.append((head + struct.pack("!I", session_id) + os.urandom(length))[:length])
    for datagram in datagrams:
        sender.send(datagram)
    verdicts = [_verdict(d, LIVE) for d in datagrams]
    assert _received(receiver) == [d for d, v in zip(datagrams, verdicts, strict=True) if v is None]
    expected = Counter(v for v in verdicts if v is not None)
    assert _nonzero(socket_filter.drops()) == dict(expected)
    assert expected[DropReason.UNKNOWN_SESSION] > 0 and expected[DropReason.BAD_LENGTH] > 0


@pytest.mark.netns
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
    # well-formed headers of no live session, beside every other reason
    unknown = [_packet(1, 1000 + i, 100) for i in range(40)]
    _send_batch(sender, unknown)
    # keepalives of 100 bytes are bad_length; a 60-byte last one too (with a live id
    # they would go to user space: the first pass only asks whether the id is live)
    wrong_lengths = [_packet(2, 4000 + i, 100) for i in range(7)] + [_packet(2, 4007, 60)]
    _send_batch(sender, wrong_lengths)
    # keepalives (32 bytes each) of unknown sessions, and data of 32 bytes (bad_length)
    small = [_packet(2 if i % 2 else 1, 2000 + i, MIN_DATAGRAM_LEN) for i in range(20)]
    _send_batch(sender, small)
    # every reason in one batch, with a data datagram (of no session) last and shorter
    everything = [
        b"\x07" + os.urandom(99),
        b"\x01\x09" + os.urandom(98),
        _packet(2, 3000, 100),
        _packet(1, 3001, 100),
        _packet(1, 3002, 50),
    ]
    _send_batch(sender, everything)
    sent = noise + short + short_last + mixed + unknown + wrong_lengths + small + everything
    assert _received(receiver) == []
    expected = Counter(_verdict(d, LIVE) for d in sent)
    assert _nonzero(socket_filter.drops()) == dict(expected)
    assert len(expected) == 5  # too_short, bad_version, unknown_type, bad_length, unknown_session


@pytest.mark.netns
def test_a_batch_with_one_push_packet_of_a_live_session_reaches_user_space_whole(filtered):
    receiver, socket_filter, sender = filtered
    for known_type, session_id in ((1, LIVE[0]), (2, LIVE[1])):
        batch = [_packet(1, 5000 + i, 100) for i in range(40)]
        batch[33] = _packet(known_type, session_id, 100)  # (a keepalive of 100: bad_length)
        _send_batch(sender, batch)
        assert _received(receiver) == batch  # user space counts each of them
    last = [_packet(1, 6000 + i, 100) for i in range(10)] + [_packet(1, LIVE[2], 40)]
    _send_batch(sender, last)
    assert _received(receiver) == last
    assert sum(socket_filter.drops().values()) == 0


@pytest.mark.netns
def test_the_live_ids_follow_the_registry(filtered, registry):
    receiver, socket_filter, sender = filtered
    newcomer = 0x0BADCAFE
    sender.send(_packet(1, newcomer, 100))
    assert _received(receiver) == []
    assert socket_filter.drops()[DropReason.UNKNOWN_SESSION] == 1
    registry.add(_record(newcomer))
    welcome = [_packet(1, newcomer, 100)] + [_packet(1, newcomer, 100) for _ in range(5)]
    sender.send(welcome[0])
    _send_batch(sender, welcome[1:])
    assert _received(receiver) == welcome
    registry.remove(newcomer, SessionEnd.CLOSED)
    registry.remove(LIVE[0], SessionEnd.CLOSED)
    sender.send(_packet(1, newcomer, 100))
    _send_batch(sender, [_packet(2, LIVE[0], MIN_DATAGRAM_LEN) for _ in range(5)])
    still_live = _packet(1, LIVE[1], 100)
    sender.send(still_live)
    assert _received(receiver) == [still_live]
    assert socket_filter.drops()[DropReason.UNKNOWN_SESSION] == 1 + 1 + 5


@pytest.mark.netns
def test_a_filter_attached_late_learns_the_ids_already_installed():
    registry = Registry()
    registry.add(_record(LIVE[0]))
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    socket_filter = attach(receiver)
    try:
        registry.observe(socket_filter)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            sender.connect(receiver.getsockname())
            datagram = _packet(1, LIVE[0], 100)
            sender.send(datagram)
            sender.send(_packet(1, LIVE[1], 100))
            assert _received(receiver) == [datagram]
        assert _nonzero(socket_filter.drops()) == {DropReason.UNKNOWN_SESSION: 1}
    finally:
        socket_filter.close()
        receiver.close()


@pytest.mark.netns
def test_a_full_session_map_hands_session_ids_to_user_space(filtered, registry, caplog):
    """When the kernel map refuses an id, that session's packets must still reach
    user space: the filter stops looking at ids, and keeps its counts."""
    receiver, socket_filter, sender = filtered
    sender.send(_packet(1, 0xDEAD, 100))
    assert _received(receiver) == []
    for session_id in range(SESSION_MAP_ENTRIES - len(LIVE)):
        socket_filter.session_added(0x10000000 + session_id)  # fill the map
    assert socket_filter.checks_sessions
    one_too_many = _record(0x0F00)
    registry.add(one_too_many)
    assert not socket_filter.checks_sessions
    assert "unknown session ids are now dropped in user space" in caplog.text
    datagrams = [_packet(1, 0x0F00, 100), _packet(1, 0xDEAD, 100), b"\x07" * 40]
    for datagram in datagrams:
        sender.send(datagram)
    assert _received(receiver) == datagrams[:2]
    assert _nonzero(socket_filter.drops()) == {
        DropReason.UNKNOWN_SESSION: 1,
        DropReason.BAD_VERSION: 1,
    }
    registry.remove(0x0F00, SessionEnd.CLOSED)  # and nothing breaks after


@pytest.mark.netns
def test_kernel_drops_do_not_count_the_filters_drops_twice(filtered):
    """The socket's own drop counter (/proc/net/udp) includes what the filter
    dropped; the exported receive-buffer drops must not."""
    receiver, socket_filter, sender = filtered
    for _ in range(50):
        sender.send(b"\x07" * 40)
    for _ in range(10):
        sender.send(_packet(1, 0xDEAD, 40))
    assert _received(receiver) == []
    assert socket_filter.drops()[read_header(b"\x07" * 40)] == 50
    assert socket_filter.drops()[DropReason.UNKNOWN_SESSION] == 10
    raw = KernelDrops(receiver, "pg-no-such-tun")()["udp_receive_buffer"]
    exported = KernelDrops(receiver, "pg-no-such-tun", filter_drops=socket_filter.drops)()
    assert (raw, exported["udp_receive_buffer"]) == (60, 0)


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
