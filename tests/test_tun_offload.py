"""The kernel takes our merged TUN writes (pushgate_io/gro.py) and gives back exactly
the packets we merged: a real TUN with IFF_VNET_HDR in a namespace of its own,
a real UDP socket and TCP connection behind it."""

import json
import sys

import pytest

from netlab import Lab

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

# Runs inside the namespace: a TUN 198.18.77.1/24, datagrams "from" 198.18.77.2
# written through it to a socket bound on 198.18.77.1.
CHECK_UDP = """
import json, socket, subprocess, sys
from netlab.packets import ipv4_udp
from pushgate_io.tun_linux import LinuxTun

tun = LinuxTun("pgoff0", offload=True)
subprocess.run(["ip", "addr", "add", "198.18.77.1/24", "dev", "pgoff0"], check=True)
subprocess.run(["ip", "link", "set", "pgoff0", "up"], check=True)
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("198.18.77.1", 9000))
receiver.settimeout(2)
payloads = [bytes([i]) * 64 for i in range(100)] + [b"a shorter last one"]
payloads += [bytes([i]) * 1400 for i in range(50)]
packets = [ipv4_udp("198.18.77.2", "198.18.77.1", 4000, 9000, p) for p in payloads]
writes = tun.coalesce(packets)
for buffers, _ in writes:
    assert tun.write_buffers(buffers)
received = []
try:
    while len(received) < len(payloads):
        received.append(receiver.recv(2048))
except TimeoutError:
    pass
print(json.dumps({
    "udp_offload": tun.udp_offload,
    "writes": [count for _, count in writes],
    "same": received == payloads,
    "received": len(received),
}))
"""


def test_merged_udp_writes_reach_a_socket_as_the_same_datagrams():
    with Lab("pgoff") as lab:
        ns = lab.namespace("tun")
        result = lab.exec(ns, [sys.executable, "-c", CHECK_UDP], cwd=".")
    outcome = json.loads(result.stdout)
    assert outcome["same"], outcome
    if outcome["udp_offload"]:  # Linux 6.2+: the kernel takes UDP GSO from a TUN
        assert outcome["writes"] == [64, 37, 46, 4]
    else:
        assert outcome["writes"] == [1] * 151


# Runs inside the namespace: the Linux client's receive path (client.datapath on
# a real TUN with IFF_VNET_HDR) takes GSO runs from a stand-in gateway on the
# loopback, opens each run in one call and writes its packets merged.
CHECK_CLIENT = """
import asyncio, json, os, socket, subprocess, time
from pushgate_io import udp
from client.datapath import Datapath
from netlab.packets import ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession
from pushgate_io.tun_linux import LinuxTun

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
tun = LinuxTun("pgcli0", offload=True)
subprocess.run(["ip", "addr", "add", "198.18.79.2/24", "dev", "pgcli0"], check=True)
subprocess.run(["ip", "link", "set", "pgcli0", "up"], check=True)
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("198.18.79.2", 9000))
receiver.setblocking(False)
gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
gateway.bind(("127.0.0.1", 0))
now = time.time()
keys = KeyMaterial(0, os.urandom(32), os.urandom(32), created_at=now)
client = TunnelSession(7, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
server = TunnelSession(7, CipherSuite.AES_256_GCM, Role.SERVER, keys)
payloads = [bytes([i]) * 1000 for i in range(100)]
sealed = [server.seal(ipv4_udp("198.18.79.1", "198.18.79.2", 4000, 9000, p), now)
          for p in payloads]
tampered = bytearray(sealed[70])
tampered[-1] ^= 1
sealed[70] = bytes(tampered)

async def run():
    loop = asyncio.get_running_loop()
    datapath = Datapath(loop, client, tun, gateway.getsockname(), time.time)
    datapath.start()
    try:
        datapath.send_keepalive()
        _, address = gateway.recvfrom(2048)
        udp.send_run(gateway, sealed[:40], address)  # one GSO run: one GRO receive
        for odd in (b"\\x00" * 40, b"\\x01", sealed[0], server.seal_keepalive(time.time())):
            gateway.sendto(odd, address)
        udp.send_run(gateway, sealed[40:], address)
        received = []
        deadline = time.monotonic() + 5
        while len(received) < 99 and time.monotonic() < deadline:
            try:
                received.append(await asyncio.wait_for(loop.sock_recv(receiver, 2048), 1))
            except TimeoutError:
                break
        return received, dict(datapath.drops)
    finally:
        datapath.stop()

received, drops = asyncio.run(run())
with open("/sys/class/net/pgcli0/statistics/rx_packets") as stats:
    writes = int(stats.read())
print(json.dumps({
    "same": received == payloads[:70] + payloads[71:],
    "received": len(received),
    "drops": drops,
    "writes": writes,
    "udp_offload": tun.udp_offload,
}))
"""


def test_the_linux_client_opens_gro_runs_and_writes_them_merged():
    """Datagrams from the gateway arrive as GRO runs; the client opens each run
    in one call (a tampered one, a replay, garbage and a keepalive among them are
    counted, nothing else lost) and hands the packets to its TUN merged."""
    with Lab("pgcli") as lab:
        ns = lab.namespace("tun")
        result = lab.exec(ns, [sys.executable, "-c", CHECK_CLIENT], cwd=".")
    outcome = json.loads(result.stdout)
    assert outcome["same"], outcome
    assert outcome["drops"] == {
        "bad_version": 1,
        "too_short": 1,
        "replay": 1,
        "bad_tag": 1,
    }, outcome
    if outcome["udp_offload"]:  # Linux 6.2+: 99 datagrams in a few GSO writes
        assert outcome["writes"] < 10, outcome
    else:
        assert outcome["writes"] == 99, outcome
