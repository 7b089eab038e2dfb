"""The dataplane's multi-queue TUN and its steering program (dataplane/tun_steering.py)
on a real TUN in a namespace of its own: the kernel puts every packet for an
address in the queue the program picks for it (`queue_of`), consecutive pool
addresses in different queues, IPv4 and IPv6; and a flood to one address fills
only its own queue's ring, so another address's packets are all still read."""

import ipaddress
import json
import sys

import pytest

from dataplane.tun_steering import queue_of
from netlab import Lab

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

QUEUES = 4
IPV4 = [f"198.18.78.{host}" for host in range(2, 10)]
IPV6 = ["2001:db8:78::2", "2001:db8:78::3", "2001:db8:78::1:5"]

# Runs inside the namespace: the TUN as the dataplane opens it, UDP datagrams sent
# through it from the namespace, then each queue read on its own.
CHECK = """
import ipaddress, json, socket, subprocess, sys, time
from dataplane import tun_steering
from pushgate_io.tun_linux import LinuxTun

queues, ipv4, ipv6 = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
tun = LinuxTun("pgsteer0", offload=True, tso_reads=True, queues=queues)
tun_steering.attach(tun.fileno())
for command in (
    "addr add 198.18.78.1/24 dev pgsteer0",
    "addr add 2001:db8:78::1/64 dev pgsteer0 nodad",
    "link set pgsteer0 txqueuelen 100 up",
):
    subprocess.run(["ip", *command.split()], check=True)
v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)


def send(address, count):
    sock = v6 if ":" in address else v4
    for _ in range(count):
        sock.sendto(b"steered", (address, 9))


def read_all():
    seen = {}
    for index, queue in enumerate(tun.read_queues()):
        while packets := queue.read_packets(1000):
            for packet in packets:
                if packet[0] >> 4 == 4:
                    destination = packet[16:20]
                else:
                    destination = packet[24:40]
                key = str(ipaddress.ip_address(destination))
                seen.setdefault(key, []).append(index)
    return seen


for address in ipv4 + ipv6:
    send(address, 5)
time.sleep(0.2)
steered = read_all()
# a flood to the first address, 10 times its ring, then 10 packets to the second
send(ipv4[0], 1000)
send(ipv4[1], 10)
time.sleep(0.2)
after_flood = read_all()
queues = len(tun.read_queues())
print(json.dumps({"steered": steered, "after_flood": after_flood, "queues": queues}))
"""


def test_each_address_has_its_queue_and_a_flood_fills_only_its_own():
    with Lab("pgsteer") as lab:
        ns = lab.namespace("tun")
        result = lab.exec(
            ns,
            [sys.executable, "-c", CHECK, str(QUEUES), ",".join(IPV4), ",".join(IPV6)],
            cwd=".",
        )
    outcome = json.loads(result.stdout)
    assert outcome["queues"] == QUEUES
    steered = outcome["steered"]
    for address in IPV4 + IPV6:
        assert steered[address] == [queue_of_text(address)] * 5, (address, steered)
    assert {queue_of_text(address) for address in IPV4} == set(range(QUEUES))
    flooded, other = IPV4[0], IPV4[1]
    after = outcome["after_flood"]
    assert len(after[flooded]) == 100  # its ring (txqueuelen) held 100, the kernel dropped the rest
    assert after[other] == [queue_of_text(other)] * 10


def queue_of_text(address: str) -> int:
    return queue_of(ipaddress.ip_address(address).packed, QUEUES)
