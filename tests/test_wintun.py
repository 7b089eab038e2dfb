"""The WinTun binding (client/wintun.py) driven against a compiled fake of
wintun.dll (tests/fakes/fake_wintun.c) that plays the OS side with real rings.

The binding under test is the one Windows runs: the same ctypes declarations,
the same reader thread and socketpair, only the library path differs.
"""

import asyncio
import ctypes
import logging
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from client import wintun
from client.datapath import Datapath
from client.wintun import (
    ERROR_BUFFER_OVERFLOW,
    ERROR_HANDLE_EOF,
    MIN_RING_CAPACITY,
    Waits,
    WintunError,
    WintunLibrary,
    WintunTun,
    adapter_guid,
    load_library,
    wide,
)
from push_protocol.aead import CipherSuite
from push_protocol.drops import DropReason
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession

FAKE_SOURCE = Path(__file__).parent / "fakes" / "fake_wintun.c"
ERROR_ACCESS_DENIED = 5


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the fake wintun.dll (make test installs it)"
    path = tmp_path_factory.mktemp("wintun") / "fake_wintun.so"
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Werror",
            "-pthread",
            "-o",
            str(path),
            str(FAKE_SOURCE),
        ],
        check=True,
    )
    return str(path)


@pytest.fixture(scope="module")
def library(fake_path):
    library = WintunLibrary(fake_path)
    library.route_logger()
    return library


@pytest.fixture(scope="module")
def fake(fake_path):
    """The fake's OS-side controls (the same loaded library as the binding's)."""
    os_side = ctypes.CDLL(fake_path)
    os_side.FakeInjectPacket.argtypes = (ctypes.c_char_p, ctypes.c_uint32)
    os_side.FakeTakeSentPacket.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    os_side.FakeFailNext.argtypes = (ctypes.c_char_p, ctypes.c_int)
    os_side.FakeAdapterLuid.argtypes = (ctypes.c_void_p,)
    os_side.FakeAdapterLuid.restype = ctypes.c_uint64
    os_side.FakeAdapterGuid.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    os_side.FakeReceiveWraps.restype = ctypes.c_uint32
    os_side.FakeSendWraps.restype = ctypes.c_uint32
    return os_side


@pytest.fixture
def waits(fake_path):
    return Waits(*load_library(fake_path))


@pytest.fixture
def tun(request, library, waits):
    device = WintunTun(library, f"pgtest-{request.node.name[:40]}", waits, MIN_RING_CAPACITY)
    yield device
    device.close()


def take_sent(fake) -> list[bytes]:
    buffer = ctypes.create_string_buffer(0x10000)
    packets = []
    while (size := fake.FakeTakeSentPacket(buffer, len(buffer))) >= 0:
        packets.append(buffer.raw[:size])
    return packets


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def packet(index: int, size: int) -> bytes:
    # An IPv4-looking packet whose bytes encode its index, so reordering or a torn
    # copy across the ring's end shows.
    body = index.to_bytes(4, "big") * (size // 4 + 1)
    return b"\x45" + body[: size - 1]


def test_packets_cross_both_rings_in_order_across_the_wrap(tun, fake):
    sizes = [40, 1500, 577, 1420, 9000, 65535, 1]
    expected = [packet(i, sizes[i % len(sizes)]) for i in range(200)]  # ~ 6x the ring
    received: list[bytes] = []

    async def pump():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_readable():
            received.extend(tun.read_packets(64))
            if len(received) == len(expected):
                done.set()

        loop.add_reader(tun.fileno(), on_readable)
        try:
            for item in expected:
                # The OS side waits while the ring is full, as a driver queue would.
                while fake.FakeInjectPacket(item, len(item)) == 0:
                    await asyncio.sleep(0.001)
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.remove_reader(tun.fileno())

    asyncio.run(pump())
    assert received == expected
    assert fake.FakeReceiveWraps() > 0
    assert fake.FakeOutstandingReceives() == 0  # every receive was released

    sent = []
    for item in expected:
        assert tun.write_packet(item)
        sent.extend(take_sent(fake))
    assert sent == expected
    assert fake.FakeSendWraps() > 0


def test_full_send_ring_is_a_false_write_then_recovers(tun, fake):
    big = packet(7, 65535)
    accepted = 0
    while tun.write_packet(big):
        accepted += 1
        assert accepted < 100, "the ring never filled"
    # 128 KiB ring, 64 KiB packets: one fits with the gap WinTun keeps.
    assert accepted == 1
    assert take_sent(fake) == [big]
    assert tun.write_packet(big)


def test_loop_is_woken_only_when_packets_wait(tun, fake):
    assert readable(tun.fileno(), 2)  # the first look after start
    assert tun.read_packets(64) == []
    assert not readable(tun.fileno(), 0.2)  # empty ring: the thread waits, quiet
    item = packet(1, 100)
    fake.FakeInjectPacket(item, len(item))
    assert readable(tun.fileno(), 2)
    assert tun.read_packets(64) == [item]
    assert not readable(tun.fileno(), 0.2)


def test_a_partial_read_keeps_the_wakeup(tun, fake):
    items = [packet(i, 60) for i in range(10)]
    for item in items:
        fake.FakeInjectPacket(item, len(item))
    assert readable(tun.fileno(), 2)
    first = tun.read_packets(4)
    assert readable(tun.fileno(), 0)  # more wait: the loop must call again
    rest = tun.read_packets(64)
    assert first + rest == items
    # The read event fired while the loop was still draining: one spurious
    # wake-up at most, which finds the ring empty; then quiet.
    if readable(tun.fileno(), 0.2):
        assert tun.read_packets(64) == []
    assert not readable(tun.fileno(), 0.2)


def test_end_of_session_raises_once_and_goes_quiet(tun, fake):
    assert readable(tun.fileno(), 2)
    tun.read_packets(64)
    fake.FakeEndSession()
    assert readable(tun.fileno(), 2)  # the read event fired
    with pytest.raises(WintunError) as raised:
        tun.read_packets(64)
    assert raised.value.winerror_code == ERROR_HANDLE_EOF
    assert not readable(tun.fileno(), 0.2)
    assert tun.read_packets(64) == []
    with pytest.raises(OSError):
        tun.write_packet(packet(1, 60))


def test_oversized_packet_is_refused(tun):
    with pytest.raises(OSError):
        tun.write_packet(b"\x45" * 65536)


def test_dll_errors_carry_the_last_error_and_the_dll_log(library, waits, fake, caplog):
    fake.FakeFailNext(b"WintunCreateAdapter", ERROR_ACCESS_DENIED)
    with (
        caplog.at_level(logging.INFO, logger="pushgate.wintun.dll"),
        pytest.raises(WintunError) as raised,
    ):
        WintunTun(library, "pgtest-denied", waits, MIN_RING_CAPACITY)
    assert raised.value.winerror_code == ERROR_ACCESS_DENIED
    assert ("pushgate.wintun.dll", logging.ERROR, "Failed to create adapter") in (
        caplog.record_tuples
    )


def test_a_failed_session_start_removes_the_new_adapter(library, waits, fake):
    removed = fake.FakeRemoved()
    fake.FakeFailNext(b"WintunStartSession", ERROR_ACCESS_DENIED)
    with pytest.raises(WintunError) as raised:
        WintunTun(library, "pgtest-nosession", waits, MIN_RING_CAPACITY)
    assert raised.value.winerror_code == ERROR_ACCESS_DENIED
    assert fake.FakeRemoved() == removed + 1
    assert fake.FakeAdapterLuid(wide("pgtest-nosession")) == 0


def test_creation_is_logged_and_identifies_the_adapter(library, waits, fake, caplog):
    name = "pgtest-ids"
    with caplog.at_level(logging.INFO, logger="pushgate.wintun.dll"):
        device = WintunTun(library, name, waits, MIN_RING_CAPACITY)
    try:
        assert ("pushgate.wintun.dll", logging.INFO, "Creating adapter") in caplog.record_tuples
        luid = fake.FakeAdapterLuid(wide(name))
        assert luid and device.luid == luid
        guid = ctypes.create_string_buffer(16)
        assert fake.FakeAdapterGuid(wide(name), guid)
        assert guid.raw == adapter_guid(name).bytes_le
        assert adapter_guid(name) == adapter_guid(name) != adapter_guid("other")
    finally:
        device.close()


def test_a_stale_adapter_is_reused_and_close_removes_what_we_created(library, waits, fake):
    name = "pgtest-stale"
    guid = wintun.GUID.from_uuid(adapter_guid(name))
    stale = library.WintunCreateAdapter(wide(name), wide("pushgate"), ctypes.byref(guid))
    creates, opens = fake.FakeCreates(), fake.FakeOpens()
    device = WintunTun(library, name, waits, MIN_RING_CAPACITY)
    assert (fake.FakeCreates(), fake.FakeOpens()) == (creates, opens + 1)
    removed = fake.FakeRemoved()
    device.close()
    assert fake.FakeRemoved() == removed  # an opened adapter is only released
    library.WintunCloseAdapter(stale)
    assert fake.FakeRemoved() == removed + 1


def test_close_stops_the_reader_thread(library, waits):
    device = WintunTun(library, "pgtest-close", waits, MIN_RING_CAPACITY)
    thread = device._thread
    assert thread.is_alive()
    device.close()
    assert not thread.is_alive()
    device.close()  # idempotent


@pytest.mark.parametrize("capacity", [MIN_RING_CAPACITY // 2, 0x30000, 0x8000000])
def test_ring_capacity_must_be_a_power_of_two_in_range(library, waits, capacity):
    with pytest.raises(ValueError):
        WintunTun(library, "pgtest-capacity", waits, capacity)


def test_driver_version_and_delete_driver_in_use(library, waits):
    assert library.driver_version() == "0.14"
    device = WintunTun(library, "pgtest-driver", waits, MIN_RING_CAPACITY)
    try:
        with pytest.raises(WintunError):  # an adapter still uses the driver
            library.delete_driver()
    finally:
        device.close()


def test_ring_full_code_is_what_the_binding_treats_as_a_drop():
    # The fake and the binding must agree on WinTun's numbers (winerror.h).
    assert (ERROR_BUFFER_OVERFLOW, ERROR_HANDLE_EOF) == (111, 38)


def test_the_client_datapath_runs_unchanged_on_wintun(library, waits, fake):
    """The client core (Datapath) on the WinTun backend: packets from the ring are
    sealed and sent over UDP, datagrams from the gateway land in the ring, and a
    full ring is a counted drop."""
    now = time.time()
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), created_at=now)
    client = TunnelSession(7, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
    server = TunnelSession(7, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", 0))
    gateway.setblocking(False)
    device = WintunTun(library, "pgtest-datapath", waits, MIN_RING_CAPACITY)
    outbound = [packet(i, 1400) for i in range(40)]
    inbound = [packet(1000 + i, 1400) for i in range(200)]  # more than the ring holds

    async def run():
        loop = asyncio.get_running_loop()
        datapath = Datapath(loop, client, device, gateway.getsockname(), time.time)
        datapath.start()
        try:
            for item in outbound:
                assert fake.FakeInjectPacket(item, len(item)) == 1
            opened, address = [], None
            while len(opened) < len(outbound):
                datagram, address = await asyncio.wait_for(loop.sock_recvfrom(gateway, 65536), 5)
                opened.append(server.open(datagram, time.time()))
            assert opened == outbound

            for item in inbound:  # nobody drains the ring meanwhile
                gateway.sendto(server.seal(item, time.time()), address)
            deadline = time.monotonic() + 5
            while client.rx_packets < len(inbound) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return datapath.drops
        finally:
            datapath.stop()

    try:
        drops = asyncio.run(run())
        delivered = take_sent(fake)
    finally:
        device.close()
        gateway.close()
    assert client.rx_packets == len(inbound)
    assert 0 < len(delivered) < len(inbound)
    assert delivered == inbound[: len(delivered)]  # in order, none torn
    assert drops == {DropReason.QUEUE_FULL: len(inbound) - len(delivered)}
