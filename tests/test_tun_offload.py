"""The kernel takes our merged TUN writes (tundev/gro.py) and gives back exactly
the packets we merged: a real TUN with IFF_VNET_HDR in a namespace of its own,
a real UDP socket and TCP connection behind it."""

import json
import sys

from netlab import Lab

# Runs inside the namespace: a TUN 198.18.77.1/24, datagrams "from" 198.18.77.2
# written through it to a socket bound on 198.18.77.1.
CHECK_UDP = """
import json, socket, subprocess, sys
from netlab.packets import ipv4_udp
from tundev.linux import LinuxTun

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
