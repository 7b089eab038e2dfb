"""Python cost per datagram of the dataplane's receive path, system calls aside.

Feeds `Device.on_udp_readable` GRO batches of 44 sealed datagrams (as one
`recvmsg` of a bulk TCP stream brings them) from an in-memory socket
(pushgate_io/memory.py), and writes to an in-memory TUN that only merges
(pushgate_io/gro.py) and counts. What is timed is everything the loop does in
Python per datagram: header, session, replay window, AEAD open, routing, MSS
check and the GRO merge for the TUN write. Two payloads: TCP segments of a bulk
stream (1420-byte packets, merged) and 64-byte UDP datagrams (merged where the
kernel has USO). Both implementations of the hot path, in one process: the
pure-Python reference and the compiled one where it was built (the packet
cipher and the TUN write merge; bench/implementations.py). Best and median of 7
runs; the kernels' own work (recvmsg, writev) is in dataplane_bench.py and the
side-by-side VPN table.
"""

import ipaddress
import os
import struct
import sys
import time

from implementations import COMPILED, NAMES, PURE, implementation, missing_note
from policy_bench import rules as policy_rules  # rule 0 allows LAN_HOST tcp 5201

from dataplane.device import Device
from dataplane.metrics import Counters
from dataplane.registry import Registry, SessionRecord
from netlab.packets import ipv4_udp
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial, Role
from push_protocol.policy import ALLOW_ALL, CompiledPolicy
from push_protocol.session import TunnelSession
from pushgate_io import udp
from pushgate_io.memory import MemoryNetwork, MemoryTun

BATCH = 44  # datagrams per GRO receive of a bulk TCP stream at MTU 1420
ROUNDS = 2000
REPEATS = 7
CLIENT, LAN_HOST, SOURCE = "198.19.0.2", "198.18.2.2", ("198.18.0.2", 40000)
GATEWAY = ("198.18.0.1", 5555)


class NoHistogram:
    def observe(self, value: float) -> None:
        pass


def tcp_segment(seq: int, payload: int = 1368) -> bytes:
    source, destination = (ipaddress.IPv4Address(a).packed for a in (CLIENT, LAN_HOST))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x10, 502, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 0, 0x4000, 64, 6, 0, source, destination
    )
    return ip + tcp + bytes(payload)


def batches(kind: str, keys: KeyMaterial, now: float) -> list[list[bytes]]:
    client = TunnelSession(7, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
    out, seq = [], 1
    for _ in range(ROUNDS):
        if kind == "tcp":
            packets = [tcp_segment(seq + 1368 * i) for i in range(BATCH)]
            seq += 1368 * BATCH
        else:
            packets = [ipv4_udp(CLIENT, LAN_HOST, 4000, 9, bytes(36)) for _ in range(BATCH)]
        datagrams, _ = client.seal_many(packets, now)
        out.append(datagrams)
    return out


def run(kind: str, keys: KeyMaterial, sealed: list, now: float, policy=ALLOW_ALL) -> float:
    server = TunnelSession(7, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    registry = Registry()
    registry.add(SessionRecord(server, (ipaddress.IPv4Address(CLIENT).packed,), 0.0, policy=policy))
    network = MemoryNetwork()
    gateway = network.socket(host=GATEWAY[0])
    gateway.bind(GATEWAY)
    client = network.socket(host=SOURCE[0])
    client.bind(SOURCE)
    device = Device(
        registry=registry,
        counters=Counters(),
        sock=gateway,
        tun=MemoryTun(offload=True),
        mtu=1420,
        tunnel_network=ipaddress.ip_network("198.19.0.0/24"),
        gateway_address=ipaddress.ip_address("198.19.0.1"),
        loop_lag_histogram=NoHistogram(),
        clock=lambda: now,
    )
    elapsed = 0.0
    for batch in sealed:  # one GSO send, one GRO receive, in the order sealed
        udp.send_run(client, batch, GATEWAY)
        start = time.perf_counter()
        device.on_udp_readable()
        elapsed += time.perf_counter() - start
    delivered = device.counters.datagrams_delivered
    if delivered != ROUNDS * BATCH:
        sys.exit(f"{kind}: {delivered} of {ROUNDS * BATCH} delivered: {device.counters}")
    return elapsed / delivered * 1e6


def main() -> None:
    now = time.time()
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), now)
    best: dict[tuple[str, str], float] = {}
    for kind, label in (("tcp", "TCP segments, 1420 B"), ("udp", "UDP datagrams, 64 B")):
        sealed = batches(kind, keys, now)
        for name in NAMES:
            with implementation(name):
                figures = sorted(run(kind, keys, list(sealed), now) for _ in range(REPEATS))
                best[kind, name] = figures[0]
                print(
                    f"receive path, {name}, {label}: {figures[0]:.2f} us of Python per "
                    f"datagram (median {figures[REPEATS // 2]:.2f}; GRO batches of {BATCH}, "
                    "system calls aside)"
                )
                if kind == "tcp":  # the same, the session under a 100-rule access policy
                    hundred = CompiledPolicy(policy_rules(100), "bench-100")
                    with_policy = sorted(
                        run(kind, keys, list(sealed), now, hundred) for _ in range(REPEATS)
                    )
                    print(
                        f"receive path, {name}, {label}, 100-rule access policy: "
                        f"{with_policy[0]:.2f} us (median {with_policy[REPEATS // 2]:.2f}; "
                        f"{with_policy[0] / figures[0]:.3f}x the best without)"
                    )
    note = missing_note()
    if note:
        print(note)
        return
    for kind in ("tcp", "udp"):
        ratio = best[kind, COMPILED] / best[kind, PURE]
        print(f"receive path, {kind}: compiled / pure Python = {ratio:.2f}")


if __name__ == "__main__":
    main()
