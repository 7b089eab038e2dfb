"""The dataplane's `Device` and the client's `Datapath`, unchanged, on the
in-memory UDP network and TUN (pushgate_io/memory.py) under a real asyncio
loop: replay, roaming, backpressure, accounting, MSS and GSO cases in
milliseconds, without root. The kernel's part is played by the memory network
(its limits are in its docstring); the namespace suites cover the real one."""

import asyncio
import errno
import functools
import inspect
import ipaddress
import os
import struct

import pytest

from client.datapath import Datapath
from client.wintun import WintunTun
from dataplane.device import Device
from dataplane.fair_queue import FairQueue
from dataplane.metrics import BoundedQueue, Counters
from dataplane.registry import Registry, SessionRecord, packed_address
from netlab.packets import ipv4_tcp_syn, ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.drops import DropReason
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd
from push_protocol.policy import ALLOW_ALL, CompiledPolicy, Rule
from push_protocol.session import TunnelSession
from pushgate_io import tso, udp
from pushgate_io.memory import MemoryNetwork, MemoryTun
from pushgate_io.tun import TunDevice
from pushgate_io.tun_linux import LinuxTun

GATEWAY = ("198.18.0.1", 5555)
CLIENT_HOST, OTHER_HOST = "198.18.0.2", "198.18.0.3"
CLIENT, LAN_HOST = "198.19.0.2", "198.18.2.2"
MTU = 1420
SESSION_ID = 0x01020304


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NoHistogram:
    def observe(self, value: float) -> None:
        pass


async def until(condition) -> None:
    """Let the loop run until `condition()` holds: readiness of the memory
    stand-ins is immediate, so a few turns suffice; the bound only stops a bug
    from spinning."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the loop went idle before the condition held")


class Gateway:
    """A Device on the memory network, with one session for CLIENT."""

    def __init__(
        self, *, offloads: bool = True, expires_at: float = 0.0, partial_tcp: bool = False
    ) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork()
        self.keys = KeyMaterial(0, os.urandom(32), os.urandom(32), self.clock.now)
        self.sock = self.network.socket(host=GATEWAY[0], offloads=offloads)
        self.sock.bind(GATEWAY)
        self.tun = MemoryTun("pgmem0", partial_tcp=partial_tcp)
        self.registry = Registry()
        self.record = SessionRecord(
            TunnelSession(SESSION_ID, CipherSuite.AES_256_GCM, Role.SERVER, self.keys),
            (packed_address(CLIENT),),
            expires_at,
            installed_at=self.clock.now,
            policy=ALLOW_ALL,
        )
        self.registry.add(self.record)
        self.counters = Counters()
        self.device = Device(
            registry=self.registry,
            counters=self.counters,
            sock=self.sock,
            tun=self.tun,
            mtu=MTU,
            tunnel_network=ipaddress.ip_network("198.19.0.0/24"),
            gateway_address=ipaddress.ip_address("198.19.0.1"),
            loop_lag_histogram=NoHistogram(),
            clock=self.clock,
        )

    def client(self, host: str = CLIENT_HOST) -> "Client":
        return Client(self, host)

    def inbound_balanced(self) -> bool:
        c = self.counters
        return c.datagrams_received == c.datagrams_delivered + sum(c.inbound_drops.values())

    def outbound_balanced(self) -> bool:
        c = self.counters
        return c.tun_packets_read == c.outbound_delivered + sum(c.outbound_drops.values())


class Client:
    """The client's end of the session, by hand: seal, send, receive, open."""

    def __init__(self, gateway: Gateway, host: str) -> None:
        self.gateway = gateway
        self.session = TunnelSession(SESSION_ID, CipherSuite.AES_256_GCM, Role.CLIENT, gateway.keys)
        self.sock = gateway.network.socket(host=host)
        self.sock.bind((host, 0))

    def seal(self, *packets: bytes) -> list[bytes]:
        return [self.session.seal(packet, self.gateway.clock.now) for packet in packets]

    def send(self, *datagrams: bytes, sock=None) -> None:
        for datagram in datagrams:
            (sock or self.sock).sendto(datagram, GATEWAY)

    def received(self) -> list[bytes]:
        packets = []
        while True:
            try:
                datagram = self.sock.recv(65536)
            except BlockingIOError:
                return packets
            packets.append(self.session.open(datagram, self.gateway.clock.now))


async def connected(gateway: Gateway) -> Client:
    """A client whose first packet gave the session its endpoint."""
    client = gateway.client()
    client.send(*client.seal(*to_lan(1)))
    await until(lambda: gateway.record.endpoint is not None)
    return client


def to_lan(n: int, size: int = 100) -> list[bytes]:
    return [ipv4_udp(CLIENT, LAN_HOST, 4000, 9, bytes([i % 256]) * size) for i in range(n)]


def from_lan(n: int, size: int = 100) -> list[bytes]:
    return [ipv4_udp(LAN_HOST, CLIENT, 9, 4000, bytes([i % 256]) * size) for i in range(n)]


def running(test):
    """Run an async test with the gateway's device started on the loop."""

    def wrapper():
        async def main():
            gateway = Gateway()
            gateway.device.start(asyncio.get_running_loop())
            try:
                await test(gateway)
            finally:
                gateway.device.stop()

        asyncio.run(main())

    wrapper.__name__ = test.__name__  # pytest collects it by name, with no fixtures
    return wrapper


@running
async def test_packets_flow_both_ways_and_every_datagram_is_accounted(gateway):
    client = gateway.client()
    packets = to_lan(5)
    client.send(*client.seal(*packets), b"\x00" * 40, b"junk")
    await until(lambda: len(gateway.tun.written) == 5)
    assert gateway.tun.written == packets
    assert gateway.record.endpoint == client.sock.getsockname()
    gateway.tun.inject(*from_lan(3))
    await until(lambda: gateway.counters.outbound_delivered == 3)
    assert client.received() == from_lan(3)
    c = gateway.counters
    assert c.datagrams_received == 7 and c.datagrams_delivered == 5
    assert c.inbound_drops[DropReason.TOO_SHORT] + c.inbound_drops[DropReason.BAD_VERSION] == 2
    assert (c.rx_packets, c.tx_packets) == (5, 3)
    assert gateway.inbound_balanced() and gateway.outbound_balanced()


def test_a_run_of_one_flow_is_decided_once_but_each_packet_still_checked():
    """One GRO batch: packets of one flow, and among them one to a port the policy
    refuses (the same addresses) and one from an address the session does not
    own. The run's decision is reused only for packets with the same route key
    (routing.route_key): the others are refused, each under its reason, and the
    flow goes on after them. (A batch's datagrams are never longer than its
    first, so one over the MTU after the flow's first is not in the same batch;
    the reuse checks the length all the same.)"""
    gateway = Gateway()
    gateway.record.policy = CompiledPolicy([Rule.make(f"{LAN_HOST}/32", 17, [(9, 9)])])
    client = gateway.client()
    allowed = to_lan(6)
    batch = [
        *allowed[:2],
        ipv4_udp(CLIENT, LAN_HOST, 4000, 10, bytes(100)),  # another port: refused
        *allowed[2:4],
        ipv4_udp("198.19.0.9", LAN_HOST, 4000, 9, bytes(100)),  # not its address
        *allowed[4:],
    ]
    udp.send_run(client.sock, client.seal(*batch), GATEWAY)  # one GRO receive
    gateway.device.on_udp_readable()
    assert gateway.tun.written == allowed
    drops = gateway.counters.inbound_drops
    assert (drops[DropReason.POLICY_DENIED], drops[DropReason.SPOOFED_SOURCE]) == (1, 1)
    assert gateway.counters.datagrams_received == len(batch)
    assert gateway.inbound_balanced()


@running
async def test_packets_the_policy_refuses_are_counted_drops_and_replies_still_flow(gateway):
    gateway.record.policy = CompiledPolicy([Rule.make(f"{LAN_HOST}/32", 17, [(9, 9)])])
    client = gateway.client()
    allowed = to_lan(3)
    refused = [
        ipv4_udp(CLIENT, LAN_HOST, 4000, 10, b"other port"),
        ipv4_udp(CLIENT, "198.18.2.3", 4000, 9, b"other host"),
        ipv4_tcp_syn(CLIENT, LAN_HOST, 4000, 9, 1300),
    ]
    client.send(*client.seal(*allowed, *refused))
    await until(lambda: gateway.counters.datagrams_received == 6)
    await until(lambda: len(gateway.tun.written) == 3)
    assert gateway.tun.written == allowed
    c = gateway.counters
    assert c.inbound_drops[DropReason.POLICY_DENIED] == 3
    assert gateway.record.drops[DropReason.POLICY_DENIED] == 3  # per session too
    assert gateway.record.last_drop_reason is DropReason.POLICY_DENIED
    assert c.datagrams_delivered == 3 and gateway.inbound_balanced()
    # the TUN side's replies are never checked: even from a port no rule names
    gateway.tun.inject(ipv4_udp(LAN_HOST, CLIENT, 7, 4000, b"reply"))
    await until(lambda: gateway.counters.outbound_delivered == 1)
    assert client.received() == [ipv4_udp(LAN_HOST, CLIENT, 7, 4000, b"reply")]
    assert gateway.outbound_balanced()


@running
async def test_a_replayed_datagram_is_dropped_and_moves_nothing(gateway):
    client = gateway.client()
    attacker = gateway.network.socket(host=OTHER_HOST)
    (first,) = client.seal(*to_lan(1))
    client.send(first)
    await until(lambda: len(gateway.tun.written) == 1)
    client.send(first, sock=attacker)
    await until(lambda: gateway.counters.datagrams_received == 2)
    assert gateway.record.endpoint == client.sock.getsockname()  # the replay moved nothing
    client.send(first)
    await until(lambda: gateway.counters.datagrams_received == 3)
    assert gateway.counters.inbound_drops[DropReason.REPLAY] == 2
    assert gateway.tun.written == to_lan(1)
    assert gateway.inbound_balanced()


@running
async def test_the_endpoint_follows_the_newest_authentic_packet_only(gateway):
    client = gateway.client()
    old, delayed, newer = client.seal(*to_lan(3))
    client.send(old)
    await until(lambda: gateway.record.endpoint is not None)
    first_endpoint = gateway.record.endpoint
    roamed = gateway.network.socket(host=OTHER_HOST)  # a NAT gave the client a new address
    client.send(newer, sock=roamed)
    await until(lambda: len(gateway.tun.written) == 2)
    assert gateway.record.endpoint == roamed.getsockname() != first_endpoint
    client.send(delayed)  # authentic, in the window, but older: delivered, not followed
    await until(lambda: len(gateway.tun.written) == 3)
    assert gateway.record.endpoint == roamed.getsockname()
    gateway.tun.inject(*from_lan(1))
    await until(lambda: gateway.counters.outbound_delivered == 1)
    assert roamed.recv(65536) and client.received() == []


@running
async def test_a_full_socket_holds_back_sealing_and_all_goes_in_order_once_writable(gateway):
    """The socket takes nothing: the first batch sealed waits in `udp_queue`, and
    nothing more is sealed; the rest waits in the send queue (where each session
    has its turn) until the socket took that batch."""
    client = await connected(gateway)
    gateway.sock.block_sends()
    gateway.tun.inject(*from_lan(100))
    await until(lambda: gateway.counters.tun_packets_read == 100)
    assert len(gateway.device.udp_queue) == 64 and len(gateway.device.send_queue) == 36
    assert client.received() == []
    assert gateway.counters.outbound_delivered == 64  # accepted into udp_queue
    gateway.sock.unblock_sends()
    await until(lambda: not gateway.device.udp_queue and not gateway.device.send_queue)
    assert client.received() == from_lan(100)
    assert gateway.outbound_balanced()


@running
async def test_while_the_socket_takes_nothing_the_send_queue_bound_is_a_counted_drop(gateway):
    gateway.device.send_queue = FairQueue("send", flow_limit=500)
    client = await connected(gateway)
    gateway.sock.block_sends()
    extra = 10
    waiting = 64 + 500  # a batch in udp_queue, a full flow in the send queue
    gateway.tun.inject(*from_lan(waiting + extra, size=20))
    await until(lambda: gateway.counters.tun_packets_read == waiting + extra)
    assert gateway.counters.outbound_drops[DropReason.QUEUE_FULL] == extra
    assert gateway.record.drops[DropReason.QUEUE_FULL] == extra
    assert gateway.device.send_queue.overflows == extra
    gateway.sock.unblock_sends()
    await until(lambda: not gateway.device.udp_queue and not gateway.device.send_queue)
    assert client.received() == from_lan(waiting, size=20)
    assert gateway.outbound_balanced()


@running
async def test_a_full_udp_queue_is_a_counted_drop(gateway):
    """The socket takes nothing and its queue holds 10: of the batch sealed, 10 wait
    and the rest are `queue_full` drops."""
    gateway.device.udp_queue = BoundedQueue("udp_send", 10)
    await connected(gateway)
    gateway.sock.block_sends()
    gateway.tun.inject(*from_lan(64))
    await until(lambda: gateway.counters.tun_packets_read == 64)
    assert gateway.counters.outbound_drops[DropReason.QUEUE_FULL] == 54
    assert gateway.device.udp_queue.overflows == 54
    assert gateway.outbound_balanced()


@running
async def test_a_tun_that_cannot_take_more_gets_its_packets_later_in_order(gateway):
    client = gateway.client()
    gateway.tun.block_writes()
    client.send(*client.seal(*to_lan(20)))
    await until(lambda: gateway.counters.datagrams_received == 20)
    assert gateway.tun.written == [] and len(gateway.device.tun_queue) == 20
    gateway.tun.unblock_writes()
    await until(lambda: not gateway.device.tun_queue)
    assert gateway.tun.written == to_lan(20)
    assert gateway.inbound_balanced()


@running
async def test_tcp_syns_are_clamped_to_the_tunnel_mtu_both_ways(gateway):
    client = gateway.client()
    syn = ipv4_tcp_syn(CLIENT, LAN_HOST, 40000, 80, mss=1460)
    client.send(*client.seal(syn))
    await until(lambda: len(gateway.tun.written) == 1)
    assert struct.unpack_from("!H", gateway.tun.written[0], 42)[0] == MTU - 40
    gateway.tun.inject(ipv4_tcp_syn(LAN_HOST, CLIENT, 80, 40000, mss=1460))
    await until(lambda: gateway.counters.outbound_delivered == 1)
    (answer,) = client.received()
    assert struct.unpack_from("!H", answer, 42)[0] == MTU - 40
    assert gateway.counters.mss_clamped == 2


@running
async def test_gso_runs_reach_the_client_and_a_device_without_gso_falls_back(gateway):
    client = await connected(gateway)
    gateway.tun.inject(*from_lan(10))
    await until(lambda: gateway.counters.outbound_delivered == 10)
    assert gateway.sock.send_calls == 1  # one GSO send
    gateway.sock.refuse_gso = True
    gateway.tun.inject(*from_lan(10))
    await until(lambda: gateway.counters.outbound_delivered == 20)
    assert not gateway.device.udp.gso and gateway.sock.send_calls == 11
    assert client.received() == from_lan(10) * 2


@running
async def test_a_send_the_kernel_refuses_is_a_drop_and_an_io_error(gateway):
    client = await connected(gateway)
    gateway.sock.fail_sends(errno.ENOBUFS)
    gateway.tun.inject(*from_lan(4))
    await until(lambda: gateway.counters.tun_packets_read == 4)
    assert gateway.counters.outbound_drops[DropReason.NO_BUFFER_SPACE] == 4
    assert gateway.counters.io_errors["udp_send"] == 1
    assert gateway.outbound_balanced() and client.received() == []


def test_housekeeping_flags_one_way_sessions_and_expires_them():
    """Driven without a loop: the device's entry points called by hand."""
    gateway = Gateway(expires_at=2000.0)
    client = gateway.client()
    client.send(*client.seal(*to_lan(3)))
    gateway.device.on_udp_readable()
    assert gateway.tun.written == to_lan(3)
    gateway.clock.now += 60  # quiet both ways: not stalled
    gateway.device.housekeeping()
    assert gateway.counters.stalled_sessions == 0
    gateway.tun.inject(*from_lan(1))
    gateway.device.on_tun_readable(gateway.tun)  # we send; the client answers nothing
    gateway.clock.now += 60
    gateway.device.housekeeping()
    assert gateway.record.stalled and gateway.counters.stalled_sessions == 1
    client.send(*client.seal(*to_lan(1)))  # it answers again, and we to it
    gateway.device.on_udp_readable()
    gateway.tun.inject(*from_lan(1))
    gateway.device.on_tun_readable(gateway.tun)
    gateway.device.housekeeping()
    assert not gateway.record.stalled and gateway.counters.stalled_sessions == 0
    gateway.clock.now = 2000.0
    gateway.device.housekeeping()
    assert SESSION_ID not in gateway.registry.by_id
    assert gateway.counters.session_expiries == 1


def client_datapath(gateway: Gateway, loop, tun) -> Datapath:
    """The Linux client's datapath for the gateway's session, on the memory network."""
    session = TunnelSession(SESSION_ID, CipherSuite.AES_256_GCM, Role.CLIENT, gateway.keys)
    socket_factory = functools.partial(gateway.network.socket, host=CLIENT_HOST)
    return Datapath(loop, session, tun, GATEWAY, gateway.clock, socket_factory=socket_factory)


def test_the_client_datapath_and_the_device_talk_in_memory_and_the_client_roams():
    """Client Datapath <-> memory network <-> Device: packets both ways, a rebind
    (new source port) followed by the gateway, a replay counted on the client."""

    async def main():
        gateway = Gateway()
        loop = asyncio.get_running_loop()
        gateway.device.start(loop)
        client_tun = MemoryTun("pgmem1")
        datapath = client_datapath(gateway, loop, client_tun)
        datapath.start()
        try:
            client_tun.inject(*to_lan(10))
            await until(lambda: len(gateway.tun.written) == 10)
            assert gateway.tun.written == to_lan(10)
            assert gateway.record.endpoint == (CLIENT_HOST, datapath.local_port)
            gateway.tun.inject(*from_lan(10))
            await until(lambda: len(client_tun.written) == 10)
            assert client_tun.written == from_lan(10)
            old_port = datapath.local_port
            datapath.rebind()
            datapath.send_keepalive()
            await until(lambda: gateway.record.endpoint[1] != old_port)
            assert gateway.record.endpoint == (CLIENT_HOST, datapath.local_port)
            replay = gateway.record.tunnel.seal(from_lan(1)[0], gateway.clock.now)
            for _ in range(2):
                gateway.sock.sendto(replay, gateway.record.endpoint)
            await until(lambda: datapath.drops[DropReason.REPLAY] == 1)
            assert client_tun.written[10:] == from_lan(1)
            assert gateway.inbound_balanced() and gateway.outbound_balanced()
        finally:
            datapath.stop()
            gateway.device.stop()

    asyncio.run(main())


def test_the_client_counts_what_its_socket_cannot_take():
    async def main():
        gateway = Gateway()
        loop = asyncio.get_running_loop()
        client_tun = MemoryTun("pgmem1")
        session = TunnelSession(SESSION_ID, CipherSuite.AES_256_GCM, Role.CLIENT, gateway.keys)
        sockets = []

        def factory(family, kind):
            sockets.append(gateway.network.socket(family, kind, host=CLIENT_HOST))
            return sockets[-1]

        datapath = Datapath(
            loop, session, client_tun, GATEWAY, gateway.clock, socket_factory=factory
        )
        datapath.start()
        try:
            sockets[-1].block_sends()
            client_tun.inject(*to_lan(5))
            await until(lambda: datapath.drops[DropReason.QUEUE_FULL] == 5)
            sockets[-1].unblock_sends()
            sockets[-1].fail_sends(errno.ENOBUFS)
            client_tun.inject(*to_lan(5))
            await until(lambda: datapath.drops[DropReason.NO_BUFFER_SPACE] == 5)
            assert gateway.network.lost == 0
            with pytest.raises(BlockingIOError):  # nothing reached the gateway
                gateway.sock.recv(65536)
        finally:
            datapath.stop()

    asyncio.run(main())


@pytest.mark.parametrize("backend", [LinuxTun, WintunTun, MemoryTun])
def test_every_tun_backend_has_the_interface_the_loops_call(backend):
    """Linux, WinTun and memory backends take the calls of pushgate_io.tun.TunDevice
    with the same parameters (the loops never know which one they have)."""
    for name, member in vars(TunDevice).items():
        if callable(member) and not name.startswith("_"):
            ours = inspect.signature(getattr(backend, name))
            assert list(ours.parameters) == list(inspect.signature(member).parameters), name


# -- the receive queue: fair turns, bounds, forged datagrams apart ------------------------

OTHER_SESSION, OTHER_CLIENT = 0x05060708, "198.19.0.3"


def second_session(gateway: Gateway) -> tuple[SessionRecord, TunnelSession]:
    """Another client's session on the same gateway: its record, and its client end."""
    record = SessionRecord(
        TunnelSession(OTHER_SESSION, CipherSuite.AES_256_GCM, Role.SERVER, gateway.keys),
        (packed_address(OTHER_CLIENT),),
        0.0,
        installed_at=gateway.clock.now,
        policy=ALLOW_ALL,
    )
    gateway.registry.add(record)
    return record, TunnelSession(OTHER_SESSION, CipherSuite.AES_256_GCM, Role.CLIENT, gateway.keys)


async def second_client(gateway: Gateway) -> tuple[TunnelSession, object]:
    """`second_session`, its client on a host of its own, connected (its first packet
    gave the session its endpoint): the client end and its socket."""
    record, session = second_session(gateway)
    sock = gateway.network.socket(host=OTHER_HOST)
    sock.bind((OTHER_HOST, 0))
    sock.sendto(session.seal(other_to_lan(1)[0], gateway.clock.now), GATEWAY)
    await until(lambda: record.endpoint is not None)
    return session, sock


def other_to_lan(n: int) -> list[bytes]:
    return [ipv4_udp(OTHER_CLIENT, LAN_HOST, 4000, 9, b"bob %d" % i) for i in range(n)]


@pytest.mark.parametrize("flood", ["own", "forged"])
def test_a_flood_does_not_make_another_session_wait_its_turn_behind_it(flood):
    """1000 datagrams wait in the socket ahead of bob's 5: alice's own, or forged under
    bob's session id from another host. Bob's are delivered after at most a round
    of the receive queue once read, not after the flood (the old FIFO served all 1000
    first)."""

    async def main():
        gateway = Gateway()
        gateway.device.start(asyncio.get_running_loop())
        try:
            alice = await connected(gateway)
            bob, bob_sock = await second_client(gateway)
            delivered_before = gateway.counters.datagrams_delivered
            if flood == "own":
                alice.send(*alice.seal(*to_lan(1000)))
            else:  # bob's id and counters, the wrong key, from alice's host
                forger = TunnelSession(
                    OTHER_SESSION,
                    CipherSuite.AES_256_GCM,
                    Role.CLIENT,
                    KeyMaterial(0, os.urandom(32), os.urandom(32), gateway.clock.now),
                )
                alice.send(*(forger.seal(p, gateway.clock.now) for p in other_to_lan(1000)))
            for packet in other_to_lan(5):
                bob_sock.sendto(bob.seal(packet, gateway.clock.now), GATEWAY)
            bobs = set(other_to_lan(5))
            await until(lambda: bobs <= set(gateway.tun.written))
            ahead = gateway.counters.datagrams_received - delivered_before - 5
            # the flood is read in 4 callbacks of 256 while 64 a callback are served,
            # and bob's are served in the first round after they are read: about 260
            # of the flood's go first (a FIFO served all 1000 first)
            assert ahead < 400, ahead
            await until(lambda: gateway.counters.datagrams_received == delivered_before + 1005)
            assert gateway.inbound_balanced() and len(gateway.device.receive_queue) == 0
            if flood == "forged":
                assert gateway.counters.inbound_drops[DropReason.BAD_TAG] >= 1
        finally:
            gateway.device.stop()

    asyncio.run(main())


def test_the_receive_queue_is_bounded_and_what_it_refuses_is_counted_on_the_session():
    """Driven by hand (no loop): one callback reads 256 datagrams into the queue, then
    serves 64. What comes for the flow once it is at its bound (here 100) is
    dropped, counted as `queue_full` in the totals and on the session; the rest is
    served later, in order."""
    gateway = Gateway()
    gateway.device.receive_queue = FairQueue(flow_limit=100)
    client = gateway.client()
    packets = to_lan(300)
    client.send(*client.seal(*packets))
    gateway.device.on_udp_readable()
    c = gateway.counters
    assert c.inbound_drops[DropReason.QUEUE_FULL] == 156
    assert gateway.record.drops[DropReason.QUEUE_FULL] == 156
    assert len(gateway.device.receive_queue) == 100 - 64
    assert c.datagrams_received == 156 + 64 and gateway.inbound_balanced()
    assert gateway.tun.written == packets[:64]
    while gateway.device.receive_queue:
        gateway.device._serve()
    gateway.device.on_udp_readable()  # the 44 still in the socket
    assert gateway.tun.written == packets[:100] + packets[256:]
    assert c.datagrams_received == 300 and gateway.inbound_balanced()


# -- the send queue: the same turns for packets from the TUN ------------------------------


def lan_to_other(n: int) -> list[bytes]:
    return [ipv4_udp(LAN_HOST, OTHER_CLIENT, 9, 4000, b"to bob %d" % i) for i in range(n)]


def test_a_flood_to_one_client_does_not_make_another_wait_behind_it():
    """1000 packets for alice wait in the TUN ahead of bob's 5. Bob's are sent after
    at most a round of the send queue once read, not after the flood (the TUN's
    FIFO, read and sealed in order, sent all 1000 first)."""

    async def main():
        gateway = Gateway()
        gateway.device.start(asyncio.get_running_loop())
        try:
            alice = await connected(gateway)
            bob, bob_sock = await second_client(gateway)
            gateway.tun.inject(*from_lan(1000), *lan_to_other(5))
            bobs, alice_ahead = [], []

            def bob_has_all() -> bool:
                while True:
                    try:
                        datagram = bob_sock.recv(65536)
                    except BlockingIOError:
                        return len(bobs) == 5
                    bobs.append(bob.open(datagram, gateway.clock.now))
                    alice_ahead.append(gateway.counters.outbound_delivered - len(bobs))

            await until(bob_has_all)
            assert bobs == lan_to_other(5)
            # one TUN queue: the flood is read 256 a callback while each callback, and
            # each loop iteration after it, seals 64; bob's go in the first turn after
            # they are read, in the fourth read: about 450 of the flood's go first
            # (the FIFO sent all 1000 first)
            assert alice_ahead[-1] < 500, alice_ahead
            await until(lambda: gateway.counters.outbound_delivered == 1005)
            assert len(alice.received()) == 1000
            assert gateway.outbound_balanced() and not gateway.device.send_queue
        finally:
            gateway.device.stop()

    asyncio.run(main())


def test_the_send_queue_is_bounded_and_what_it_refuses_is_counted_on_the_session():
    """Driven by hand (no loop): one callback reads 256 packets from the TUN into the
    send queue, then seals 64. What comes for the session once its flow is at its
    bound (here 100) is dropped, counted as `queue_full` in the outbound totals and
    on the session; the rest is sent later, in order."""
    gateway = Gateway()
    gateway.device.send_queue = FairQueue("send", flow_limit=100)
    client = gateway.client()
    client.send(*client.seal(*to_lan(1)))
    gateway.device.on_udp_readable()  # the session's endpoint
    packets = from_lan(300)
    gateway.tun.inject(*packets)
    gateway.device.on_tun_readable(gateway.tun)
    c = gateway.counters
    assert c.outbound_drops[DropReason.QUEUE_FULL] == 156
    assert gateway.record.drops[DropReason.QUEUE_FULL] == 156
    assert len(gateway.device.send_queue) == 100 - 64
    assert c.tun_packets_read == 256 and c.outbound_delivered == 64
    assert client.received() == packets[:64]
    while gateway.device.send_queue:
        gateway.device._serve_send()
    gateway.device.on_tun_readable(gateway.tun)  # the 44 still in the TUN
    assert client.received() == packets[64:100] + packets[256:]
    assert c.tun_packets_read == 300 and gateway.outbound_balanced()


def test_packets_for_a_session_removed_while_they_wait_are_counted():
    """Driven by hand: packets for a session that ends while they wait in the send
    queue are `no_route` drops (no session owns their destination any more)."""
    gateway = Gateway()
    client = gateway.client()
    client.send(*client.seal(*to_lan(1)))
    gateway.device.on_udp_readable()
    gateway.tun.inject(*from_lan(100))
    gateway.device.on_tun_readable(gateway.tun)  # 64 sent, 36 wait
    gateway.registry.remove(SESSION_ID, SessionEnd.CLOSED)
    gateway.device._serve_send()
    c = gateway.counters
    assert c.outbound_delivered == 64 and c.outbound_drops[DropReason.NO_ROUTE] == 36
    assert gateway.outbound_balanced() and not gateway.device.send_queue


# -- partial checksums (pushgate_io/tso.py) ------------------------------------------------


def tcp_from_lan(payload: bytes, seq: int = 1) -> bytes:
    """A complete TCP segment from the lan host to the client."""
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0,
        ipaddress.IPv4Address(LAN_HOST).packed, ipaddress.IPv4Address(CLIENT).packed,
    )  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 1, 5 << 4, 0x18, 500, 0, 0)
    packet = bytearray(ip + tcp + payload)
    packet[10:12] = (0xFFFF - tso.ones_sum(packet[:20])).to_bytes(2, "big")
    return tso.complete(tso.to_partial(bytes(packet)))


@pytest.mark.parametrize("tun_partial", [True, False])
@pytest.mark.parametrize("client_completes", [True, False])
def test_each_session_gets_tcp_checksums_in_the_form_its_client_takes(
    tun_partial, client_completes
):
    """Whatever form the TUN reads give (partial with TSO reads, complete without),
    a client that completes checksums gets TCP packets in the partial form, and one
    that does not (WinTun, older clients) gets them complete; a packet from another
    client through the hub too."""

    async def main():
        gateway = Gateway(partial_tcp=tun_partial)
        gateway.record.partial_checksums = client_completes
        gateway.device.start(asyncio.get_running_loop())
        try:
            alice = await connected(gateway)
            complete = [tcp_from_lan(bytes([i]) * 1200, 1 + i * 1200) for i in range(3)]
            partial = [tso.to_partial(p) for p in complete]
            gateway.tun.inject(*(partial if tun_partial else complete))
            await until(lambda: gateway.counters.outbound_delivered == 3)
            assert alice.received() == (partial if client_completes else complete)
            # the hub: bob's complete packet to alice
            _, bob = second_session(gateway)
            bob_sock = gateway.network.socket(host=OTHER_HOST)
            bob_sock.bind((OTHER_HOST, 0))
            hub = bytearray(tcp_from_lan(b"from bob"))
            hub[12:16] = ipaddress.IPv4Address(OTHER_CLIENT).packed
            hub[10:12] = b"\0\0"
            hub[10:12] = (0xFFFF - tso.ones_sum(hub[:20])).to_bytes(2, "big")
            hub = tso.complete(bytes(hub))
            bob_sock.sendto(bob.seal(hub, gateway.clock.now), GATEWAY)
            await until(lambda: gateway.counters.tx_packets == 4)
            assert alice.received() == [tso.to_partial(hub) if client_completes else hub]
        finally:
            gateway.device.stop()

    asyncio.run(main())


def tcp_to_lan(payload: bytes, seq: int = 1) -> bytes:
    """A complete TCP segment from the client to the lan host."""
    packet = bytearray(tcp_from_lan(payload, seq))
    packet[12:20] = packet[16:20] + packet[12:16]  # swapped: the sums stay right
    packet[20:24] = packet[22:24] + packet[20:22]
    return bytes(packet)


def test_a_client_with_tso_reads_sends_complete_checksums():
    """A Linux client's TUN with TSO reads gives TCP packets in the partial form
    (pushgate_io/tso.py); the dataplane takes complete ones, so the client
    completes them before sealing. A read that could not be cut (an empty packet)
    is counted as `inner_malformed` and the rest still go."""

    async def main():
        gateway = Gateway()
        loop = asyncio.get_running_loop()
        gateway.device.start(loop)
        client_tun = MemoryTun("pgmem1", partial_tcp=True)
        datapath = client_datapath(gateway, loop, client_tun)
        datapath.start()
        try:
            complete = [tcp_to_lan(bytes([i]) * 1000, 1 + 1000 * i) for i in range(3)]
            client_tun.inject(tso.to_partial(complete[0]), b"", *map(tso.to_partial, complete[1:]))
            await until(lambda: len(gateway.tun.written) == 3)
            assert gateway.tun.written == complete
            assert datapath.drops == {DropReason.INNER_MALFORMED: 1}
        finally:
            datapath.stop()
            gateway.device.stop()

    asyncio.run(main())


def test_a_gro_batch_for_a_full_flow_is_dropped_whole_and_counted():
    """Driven by hand: a flow at its bound (here 40) refuses the next GRO batch
    before it is cut apart; its datagrams are `queue_full` drops, in the totals
    and on the session."""
    gateway = Gateway()
    gateway.device.receive_queue = FairQueue(flow_limit=40)
    client = gateway.client()
    packets = to_lan(80)
    sealed = client.seal(*packets)
    udp.send_run(client.sock, sealed[:40], GATEWAY)  # one GSO send: one GRO receive
    udp.send_run(client.sock, sealed[40:], GATEWAY)
    gateway.device.on_udp_readable()
    c = gateway.counters
    assert c.inbound_drops[DropReason.QUEUE_FULL] == 40
    assert gateway.record.drops[DropReason.QUEUE_FULL] == 40
    assert gateway.device.receive_queue.overflows == 40
    gateway.device._serve()
    assert gateway.tun.written == packets[:40]
    assert c.datagrams_received == 80 and gateway.inbound_balanced()
