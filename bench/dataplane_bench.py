"""Dataplane packets per second and memory per installed session.

pps: a sender process in the client namespace blasts pre-sealed push packets
(1400-byte and 64-byte inner IPv4/UDP packets) at a real pushgate-dataplane;
the figure is the dataplane's own count of datagrams received, authenticated,
replay-checked, routed and written to its TUN, per second of the run
(pushgate_dataplane_datagrams_delivered_total) per second of CPU the dataplane
process used (process_cpu_seconds_total), i.e. the loop's capacity on one core,
independent of how fast the sender could go. Sealing is measured by
codec_bench.py; what the kernel's socket buffer drops before the dataplane sees
it is reported beside.

memory: RSS growth of a fresh process that installs 100,000 sessions into the
registry (TunnelSession with AES-256-GCM keys, replay windows, addresses).
"""

import ipaddress
import pickle
import subprocess
import sys
import tempfile
import time

from netlab import Lab, metrics
from netlab.dataplane_lab import GW_TUNNEL, GW_UNDERLAY, PORT, Gateway
from netlab.feed import session
from netlab.packets import ipv4_udp

SECONDS = 4.0
SESSIONS = 100_000

SENDER = """
import pickle, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
datagrams = pickle.load(sys.stdin.buffer)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sent, end = 0, time.monotonic() + seconds
for datagram in datagrams:
    try:
        s.sendto(datagram, (host, port))
    except BlockingIOError:
        continue
    sent += 1
    if not sent % 256 and time.monotonic() > end:
        break
print(sent)
"""


def pps(size: int) -> str:
    with tempfile.TemporaryDirectory() as workdir, Lab("pgbench") as lab:
        gateway = Gateway(lab, workdir)
        sess = session(0x2001, "198.19.10.2")
        gateway.start_with(sess)
        client = gateway.client(sess)
        payload = bytes(size - 28)
        now = time.time()
        packet = ipv4_udp("198.19.10.2", GW_TUNNEL, 4000, 9, payload)
        count = 400_000 if size <= 200 else 150_000
        datagrams = [client.session.seal(packet, now) for _ in range(count)]
        before = gateway.scrape()
        sender = lab.start(
            gateway.cl,
            [sys.executable, "-c", SENDER, GW_UNDERLAY, str(PORT), str(SECONDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        out, _ = sender.communicate(pickle.dumps(datagrams), timeout=120)
        time.sleep(0.5)
        after = gateway.scrape()
        gateway.feed.stop()

        def delta(name: str) -> float:
            return metrics.total(after, name) - metrics.total(before, name)

        delivered = delta("pushgate_dataplane_datagrams_delivered_total")
        received = delta("pushgate_dataplane_datagrams_received_total")
        cpu = delta("process_cpu_seconds_total")
        sent = int(out)
        return (
            f"dataplane inbound {size:>5}-byte packets: {delivered / cpu / 1000:6.1f} k packets "
            f"per CPU-second delivered to the TUN ({delivered:.0f} of {sent} sent at full "
            f"speed; {sent - received:.0f} dropped by the kernel socket buffer before the loop)"
        )


MEMORY = f"""
import os, time
from dataplane.registry import Registry, SessionRecord
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

registry = Registry()
base = rss()
now = time.time()
for i in range({SESSIONS}):
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), now)
    tunnel = TunnelSession(i + 1, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    address = (0xC6130000 + 2 + i).to_bytes(4, "big")
    registry.add(SessionRecord(tunnel, (address,), 0.0))
print(rss() - base)
"""


def memory() -> str:
    grown = int(
        subprocess.run(
            [sys.executable, "-c", MEMORY], capture_output=True, text=True, check=True
        ).stdout
    )
    return (
        f"dataplane memory: {SESSIONS} installed sessions add {grown / 2**20:.0f} MiB RSS, "
        f"{grown / SESSIONS / 1024:.2f} KiB per session"
    )


def main() -> int:
    assert ipaddress.ip_address(GW_TUNNEL) in ipaddress.ip_network("198.18.0.0/15")
    for size in (1400, 64):
        print(pps(size), flush=True)
    print(memory(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
