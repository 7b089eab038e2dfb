"""The dataplane's series are bounded: 10,000 sessions passing traffic and noise from
60,000 source addresses leave /metrics with exactly the series of a gateway with one
session. No label takes a value from a client (session, user, address, endpoint);
per-session figures are the stats socket's.

The dataplane's `Device` and its Prometheus collectors run unchanged, in process, on
the in-memory UDP network and TUN (pushgate_io/memory.py), so the many sources need
no namespace."""

import asyncio
import ipaddress
import os
import random

from prometheus_client import CollectorRegistry

from dataplane.device import Device
from dataplane.metrics import Counters, UserTotals, loop_lag_histogram, register_collectors
from dataplane.registry import Registry, SessionRecord, packed_address
from netlab.packets import ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial, Role
from push_protocol.policy import ALLOW_ALL
from push_protocol.session import TunnelSession
from push_protocol.version import register_build_info
from pushgate_io.memory import RECEIVE_QUEUE_LENGTH, MemoryNetwork, MemoryTun

GATEWAY = ("198.19.255.1", 5555)
TUNNEL_NETWORK = ipaddress.ip_network("198.19.0.0/18")  # 16,382 client addresses
CLIENT_HOSTS = ipaddress.ip_network("198.19.128.0/17")  # the sessions' own sources
NOISE_HOSTS = ipaddress.ip_network("198.18.0.0/16")  # 65,536 addresses for noise
LAN_HOST = "198.19.200.2"
SESSIONS, NOISE_SOURCES = 10_000, 60_000
ACCOUNTS = 50  # the sessions' users, for the opt-in user-labelled families
NOW = 1000.0


def series(prometheus: CollectorRegistry) -> set[tuple[str, tuple]]:
    """Every series /metrics would show: name and label set."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in prometheus.collect()
        for sample in family.samples
    }


class Client:
    """One session's client end, by hand."""

    def __init__(self, index: int) -> None:
        self.session_id = 0x10000 + index
        self.keys = KeyMaterial(0, os.urandom(32), os.urandom(32), NOW)
        self.address = str(TUNNEL_NETWORK[index + 2])
        self.source = (str(CLIENT_HOSTS[index + 1]), 40000 + index % 20000)
        self.session = TunnelSession(
            self.session_id, CipherSuite.AES_256_GCM, Role.CLIENT, self.keys
        )

    def record(self) -> SessionRecord:
        server = TunnelSession(self.session_id, CipherSuite.AES_256_GCM, Role.SERVER, self.keys)
        user = f"user{self.session_id % ACCOUNTS}"
        return SessionRecord(
            server, (packed_address(self.address),), 0.0, user, installed_at=NOW, policy=ALLOW_ALL
        )

    def datagram(self) -> bytes:
        return self.session.seal(ipv4_udp(self.address, LAN_HOST, 4000, 9, b"x" * 64), NOW)


def noise(index: int, live: list[int], rng: random.Random) -> bytes:
    """Junk of every kind: random bytes, headers naming no session, forged tags on a
    live session (bad_tag)."""
    kind = index % 3
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    session_id = live[index % len(live)] if kind == 2 else rng.randrange(1, 0xFFFF)
    return bytes([1, 1, 0, 0]) + session_id.to_bytes(4, "big") + rng.randbytes(80)


async def deliver(network, device, counters, datagrams) -> None:
    """Hand (source, datagram) pairs to the gateway's socket in batches the memory
    network's receive queue holds, letting the loop read each batch."""
    sent = counters.datagrams_received
    batch = RECEIVE_QUEUE_LENGTH // 2
    for start in range(0, len(datagrams), batch):
        for source, datagram in datagrams[start : start + batch]:
            # a datagram from an address no socket holds: the memory network's own path
            network._deliver(source, GATEWAY, [datagram])
        sent += len(datagrams[start : start + batch])
        for _ in range(100_000):
            if counters.datagrams_received >= sent:
                break
            await asyncio.sleep(0)
    assert network.lost == 0
    assert counters.datagrams_received == sent


def test_series_stay_the_same_with_10k_sessions_and_noise_from_60k_sources():
    """And with the opt-in per-user families on, one series more per account (and
    direction), however many sessions: bounded by the accounts."""
    off, off_one = asyncio.run(traffic_and_noise(user_metrics=False))
    assert off == off_one
    on, on_one = asyncio.run(traffic_and_noise(user_metrics=True))
    users = {labels for name, labels in on if name == "pushgate_dataplane_user_drops_total"}
    assert len(users) == ACCOUNTS and len(on) == len(off) + 3 * ACCOUNTS
    assert len(on_one) == len(off_one) + 3  # one account seen with one session
    assert on_one - off_one <= {
        (name, labels) for name, labels in on if "_user_" in name
    }  # nothing but the user families differs


async def traffic_and_noise(user_metrics: bool):
    """The series with one session and one datagram, and then with 10k sessions
    passing traffic and noise from 60k sources."""
    network = MemoryNetwork()
    sock = network.socket(host=GATEWAY[0])
    sock.bind(GATEWAY)
    registry, counters = Registry(), Counters()
    prometheus = CollectorRegistry()
    register_build_info(prometheus)
    device = Device(
        registry=registry,
        counters=counters,
        sock=sock,
        tun=MemoryTun("pgmem0"),
        mtu=1420,
        tunnel_network=TUNNEL_NETWORK,
        gateway_address=TUNNEL_NETWORK[1],
        loop_lag_histogram=loop_lag_histogram(prometheus),
        clock=lambda: NOW,
    )
    register_collectors(prometheus, counters, registry, device.queues, user_metrics=user_metrics)
    device.start(asyncio.get_running_loop())
    try:
        clients = [Client(index) for index in range(SESSIONS)]
        registry.add(clients[0].record())
        await deliver(network, device, counters, [(clients[0].source, clients[0].datagram())])
        assert counters.datagrams_delivered == 1
        one_session = series(prometheus)

        for client in clients[1:]:
            registry.add(client.record())
        await deliver(network, device, counters, [(c.source, c.datagram()) for c in clients])
        rng = random.Random(21)
        live = [client.session_id for client in clients]
        await deliver(
            network,
            device,
            counters,
            [
                ((str(NOISE_HOSTS[index]), 1024 + index % 60000), noise(index, live, rng))
                for index in range(NOISE_SOURCES)
            ],
        )
        # the traffic and the noise did reach the dataplane and were counted
        assert counters.datagrams_delivered == 1 + SESSIONS
        assert sum(counters.inbound_drops.values()) == NOISE_SOURCES
        assert len({record.endpoint for record in registry.by_id.values()}) == SESSIONS
        return series(prometheus), one_session
    finally:
        device.stop()


class Record:
    """What UserTotals reads of a session record."""

    def __init__(self, session_id: int, user: str, rx: int, tx: int, drops: int) -> None:
        self.session_id, self.username = session_id, user
        self.tunnel = type("Tunnel", (), {"rx_bytes": rx, "tx_bytes": tx})()
        self.drops = {"bad_tag": drops}


def test_a_users_totals_never_go_down_when_sessions_end_or_start_over():
    totals = UserTotals()
    assert totals.update([Record(1, "alice", 100, 50, 1), Record(2, "alice", 10, 5, 0)]) == {
        "alice": [110, 55, 1]
    }
    # session 1 ended; session 2 went on; bob came
    assert totals.update([Record(2, "alice", 20, 5, 0), Record(3, "bob", 7, 7, 7)]) == {
        "alice": [120, 55, 1],
        "bob": [7, 7, 7],
    }
    # session 3's counters started over (a restarted dataplane re-learned it)
    assert totals.update([Record(2, "alice", 20, 5, 0), Record(3, "bob", 1, 1, 0)]) == {
        "alice": [120, 55, 1],
        "bob": [8, 8, 7],
    }
    assert totals.update([]) == {"alice": [120, 55, 1], "bob": [8, 8, 7]}
