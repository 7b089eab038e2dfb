"""What a flood of random datagrams at the dataplane port costs valid traffic.

    python bench/noise_bench.py [--seconds 5] [--repeats 3] [--results FILE]

A whole gateway in namespaces (netlab.gateway: auth, dataplane, one client,
198.18.0.0/15 only). A single-stream iperf3 TCP test runs through the tunnel
from the client to the gateway's tunnel address, first alone, then while a
sender in a second client namespace floods the dataplane's UDP port with
random datagrams as fast as one process can send them (UDP GSO batches of
random sizes from 1 to 1472 bytes and random bytes: none is a valid push
packet). Alone and flooded alternate, `--repeats` times; the figure is the
median ratio of throughput with noise to throughput without (target: >= 0.90).

It also reports the noise rate, how many datagrams the dataplane counted as
received and dropped during the flood, and checks at the end of every flood
that received == delivered + sum(drops) (DESIGN.md invariant 1).
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

from dataplane.metrics import INBOUND
from netlab import Lab, metrics
from netlab.gateway import DATAPLANE_PORT, GATEWAY, LAN_HOST, GatewayLab, tool

TUNNEL_GATEWAY = "198.19.0.1"

NOISE = """
import os, random, socket, sys, time
host, port, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
SOL_UDP, UDP_SEGMENT = 17, 103
pool = memoryview(os.urandom(1 << 22))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
s.connect((host, port))
rng = random.Random(9)
sizes = [rng.randint(1, 1472) for _ in range(4096)]
offsets = [rng.randrange(len(pool) - 65536) for _ in range(4096)]
sent, end, i = 0, time.monotonic() + seconds, 0
while True:
    i = (i + 1) & 4095
    size, offset = sizes[i], offsets[i]
    try:
        if mode == "gso":  # 64 datagrams of one random size per call
            count = min(64, 65000 // size)
            segment = size.to_bytes(2, sys.byteorder)
            s.sendmsg([pool[offset : offset + size * count]], [(SOL_UDP, UDP_SEGMENT, segment)])
        else:  # one datagram of a random size per call
            count = 1
            s.send(pool[offset : offset + size])
        sent += count
    except (BlockingIOError, ConnectionRefusedError):
        pass
    if not i & 63 and time.monotonic() > end:
        break
print(sent)
"""


def policy_groups(rules: int) -> str:
    """Config groups for the side-by-side policy run: `plain` allows the lan network
    whole (the cost of "allow all"), `policy` only the lan host's TCP port 5201,
    among `rules - 1` other /29 prefixes with ports of their own. The gateway's
    iperf3 port stays reachable for both: it is an offered service."""
    decoys = [
        f'"198.18.{128 + i // 32}.{i % 32 * 8}/29 tcp {22 + i % 4}"' for i in range(rules - 1)
    ]
    policy = ", ".join([f'"{LAN_HOST}/32 tcp 5201"', *decoys])
    routes = f'routes = ["{TUNNEL_GATEWAY}/32", "{LAN_HOST}/32"]\n'
    return (
        f'\n[groups.plain]\nallow = ["{LAN_HOST.rsplit(".", 1)[0]}.0/24"]\n{routes}'
        f"\n[groups.policy]\nallow = [{policy}]\n{routes}"
    )


@contextlib.contextmanager
def gateway_with_iperf(lab_name: str, clients: int = 1, policy_rules: int = 0):
    """A whole gateway in namespaces with client 0 connected (a route to the
    gateway's tunnel address only) and an iperf3 server on that address. With
    `policy_rules`, client 1 is connected too, as a user whose access policy has
    that many rules (`policy_groups`), and an iperf3 server runs on the lan host
    too."""
    with tempfile.TemporaryDirectory() as workdir, Lab(lab_name) as lab:
        gateway = GatewayLab(
            lab,
            workdir,
            clients=max(clients, 2) if policy_rules else clients,
            routes=(f"{TUNNEL_GATEWAY}/32",),
            offered_services=(f"tcp {TUNNEL_GATEWAY}:5201", f"udp {TUNNEL_GATEWAY}:5201"),
        )
        gateway.add_user("bench")
        if policy_rules:
            with open(gateway.config, "a") as handle:
                handle.write(policy_groups(policy_rules))
            gateway.add_user("bench-policy")
            for group, user in (("plain", "bench"), ("policy", "bench-policy")):
                subprocess.run(
                    [
                        tool("pushgate-admin"),
                        "group",
                        "add",
                        group,
                        user,
                        "--config",
                        gateway.config,
                    ],
                    check=True,
                    capture_output=True,
                )
        gateway.start()
        gateway.connect(0, "bench")
        if policy_rules:
            gateway.connect(1, "bench-policy")
            lab.start(
                gateway.lan,
                ["iperf3", "-s", "-B", LAN_HOST],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        server = lab.start(
            gateway.gw,
            ["iperf3", "-s", "-B", TUNNEL_GATEWAY],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            yield gateway
        finally:
            lab.stop(server)


def save_results(lines: list[str], path: str | None) -> list[dict]:
    """Append the RESULT lines to `path` (if given); their fields, parsed."""
    if path:
        with open(path, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))
    return [dict(item.split("=", 1) for item in line.split()[1:]) for line in lines]


def iperf(
    gateway: GatewayLab, seconds: float, *extra: str, client: int = 0, to: str = TUNNEL_GATEWAY
) -> dict:
    """A single-stream iperf3 TCP test from client `client` to the gateway's tunnel
    address or `to` (`-R`: the other way); its JSON report's "end"."""
    result = gateway.lab.exec(
        gateway.clients[client],
        ["iperf3", "-c", to, "-t", str(seconds), "-O", "1", "-J", *extra],
        timeout=seconds + 30,
    )
    return json.loads(result.stdout)["end"]


def gbps(end: dict) -> float:
    return end["sum_received"]["bits_per_second"] / 1e9


def invariant(scrape: dict) -> tuple[float, float]:
    received = metrics.total(scrape, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(scrape, "pushgate_dataplane_datagrams_delivered_total")
    drops = metrics.total(scrape, "pushgate_dataplane_drops_total", direction=INBOUND)
    return received, delivered + drops


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append RESULT lines here")
    parser.add_argument(
        "--mode",
        choices=("gso", "plain"),
        default="gso",
        help="gso: 64 datagrams of one random size per sendmsg (the fastest sender); "
        "plain: one datagram of a random size per send",
    )
    parser.add_argument(
        "--closed-port",
        action="store_true",
        help="control: send the same noise to a port nobody listens on, so only the "
        "sender's share of the 2 cores and the kernel's work remain",
    )
    args = parser.parse_args(argv)
    label = args.mode + ("-closed-port" if args.closed_port else "")
    lines = []
    with gateway_with_iperf("pgnoise", clients=2) as gateway:
        for run in range(1, args.repeats + 1):
            quiet = gbps(iperf(gateway, args.seconds))
            before = gateway.scrape()
            noise = gateway.lab.start(
                gateway.clients[1],
                [
                    sys.executable,
                    "-c",
                    NOISE,
                    GATEWAY,
                    str(DATAPLANE_PORT + 1 if args.closed_port else DATAPLANE_PORT),
                    str(args.seconds + 2),
                    args.mode,
                ],
                stdout=subprocess.PIPE,
            )
            time.sleep(0.5)
            noisy = gbps(iperf(gateway, args.seconds))
            sent = int(noise.communicate(timeout=60)[0])
            time.sleep(0.3)
            after = gateway.scrape()
            received, accounted = invariant(after)
            counted = received - invariant(before)[0]
            line = (
                f"RESULT scenario=pushgate-noise-{label} run={run} tcp_gbps={quiet:.3f} "
                f"tcp_noise_gbps={noisy:.3f} ratio={noisy / quiet:.3f} "
                f"noise_kpps={sent / (args.seconds + 2) / 1000:.1f} "
                f"dataplane_received={counted:.0f} invariant_ok={int(received == accounted)}"
            )
            print(line, file=sys.stderr, flush=True)
            lines.append(line)
    fields = save_results(lines, args.results)
    ratio = statistics.median(float(f["ratio"]) for f in fields)
    quiet = statistics.median(float(f["tcp_gbps"]) for f in fields)
    noisy = statistics.median(float(f["tcp_noise_gbps"]) for f in fields)
    rate = statistics.median(float(f["noise_kpps"]) for f in fields)
    ok = all(f["invariant_ok"] == "1" for f in fields)
    print(
        f"noise flood ({label}): single-stream TCP {quiet:.2f} Gbit/s alone, {noisy:.2f} "
        f"under {rate:.0f} k random datagrams/s sent at the dataplane port: {ratio:.2f}x "
        f"(cost {100 * (1 - ratio):.0f}%, target <= 10%; medians of {len(fields)}); "
        f"received == delivered + drops after every flood: {'yes' if ok else 'NO'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
