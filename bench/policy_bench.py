"""Per-packet cost of the router's decision with an access policy of 1, 100 and
10,000 rules, as ratios to a policy that allows everything.

    python bench/policy_bench.py [--calls 200000] [--repeats 5]

Times `Router.from_session` (dataplane/routing.py) for TCP segments from a
client to the network behind the gateway, every one allowed (the decision the
receive loop makes for each packet it sends to the TUN), in two patterns: one
flow (one destination: the policy's destination cache answers) and destinations
spread over 4096 addresses (the cache, 256 entries, misses most of the time and
the interval lookup answers). Rule 0 allows the destinations (tcp 5201); the
other rules are /29 prefixes next to them with their own ports, so the lookup
has about 2 intervals per rule to search. Also prints the time to compile each
policy (once per distinct policy, at install or change). Best of `--repeats`;
the CPU model is printed with the figures (compare ratios of one run only).
"""

import argparse
import ipaddress
import os
import struct
import sys
import time

from dataplane.registry import Registry, SessionRecord
from dataplane.routing import TO_TUN, Router
from push_protocol.aead import CipherSuite
from push_protocol.keys import KeyMaterial, Role
from push_protocol.policy import ALLOW_ALL, CompiledPolicy, Rule
from push_protocol.session import TunnelSession

CLIENT = "198.19.0.2"
SPREAD = 4096
FLOW_DESTINATION = "198.18.2.2"
BASE = int(ipaddress.IPv4Address("198.18.0.0"))
DECOY_BASE = BASE + SPREAD  # decoys after the destinations' /20
DECOY_PORTS = ((22, 22), (443, 443), (8000, 8999), (53, 53))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return "unknown CPU"


def rules(count: int) -> list[Rule]:
    allowed = [Rule.make("198.18.0.0/20", 6, [(5201, 5201)])]
    decoys = [
        Rule.make(str(ipaddress.IPv4Network((DECOY_BASE + 8 * i, 29))), 6, [DECOY_PORTS[i % 4]])
        for i in range(count - 1)
    ]
    return allowed + decoys


def segment(destination: str) -> bytes:
    source, target = (ipaddress.IPv4Address(a).packed for a in (CLIENT, destination))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 502, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1420, 0, 0x4000, 64, 6, 0, source, target)
    return ip + tcp + bytes(1420 - 40)


def per_call(router: Router, record: SessionRecord, packets: list, calls: int) -> float:
    rounds = calls // len(packets)
    decide = router.from_session
    start = time.perf_counter()
    for _ in range(rounds):
        for packet in packets:
            decide(record, packet)
    return (time.perf_counter() - start) / (rounds * len(packets)) * 1e9


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), time.time())
    tunnel = TunnelSession(7, CipherSuite.AES_256_GCM, Role.SERVER, keys)
    record = SessionRecord(tunnel, (ipaddress.IPv4Address(CLIENT).packed,), 0.0)
    registry = Registry()
    registry.add(record)
    router = Router(
        registry,
        ipaddress.ip_network("198.19.0.0/24"),
        ipaddress.ip_address("198.19.0.1"),
        1500,
    )
    patterns = {
        "one flow": [segment(FLOW_DESTINATION)],
        f"{SPREAD} destinations": [
            segment(str(ipaddress.IPv4Address(BASE + i))) for i in range(SPREAD)
        ],
    }
    policies = {"allow all": ALLOW_ALL}
    compile_ms = {}
    for count in (1, 100, 10_000):
        built = rules(count)
        start = time.perf_counter()
        policies[f"{count} rules"] = CompiledPolicy(built, f"bench-{count}")
        compile_ms[count] = (time.perf_counter() - start) * 1e3
    print(f"policy bench on {cpu_model()}, Python {sys.version.split()[0]}")
    for pattern, packets in patterns.items():
        figures = {}
        for name, policy in policies.items():
            record.policy = policy
            if any(router.from_session(record, p) is not TO_TUN for p in packets):
                sys.exit(f"{name}, {pattern}: a packet the policy should allow was refused")
            figures[name] = min(
                per_call(router, record, packets, args.calls) for _ in range(args.repeats)
            )
        base = figures["allow all"]
        print(
            f"router decision, {pattern}: "
            + ", ".join(f"{name} {ns:.0f} ns ({ns / base:.2f}x)" for name, ns in figures.items())
        )
    print(
        "compiling: " + ", ".join(f"{count} rules {ms:.1f} ms" for count, ms in compile_ms.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
