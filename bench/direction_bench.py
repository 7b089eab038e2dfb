"""Single-stream TCP through pushgate in both directions: upload and download.

    python bench/direction_bench.py [--seconds 5] [--repeats 3] [--results FILE]

The shared harness (make bench-vpn) measures from the client towards the
gateway only, but a remote-access user mostly downloads: the two directions
take different paths (the dataplane reads its TUN and seals, the client opens
and writes its TUN). A whole gateway in namespaces (netlab.gateway, 198.18.0.0/15
only); iperf3 from the client to the gateway's tunnel address and back (-R),
interleaved `--repeats` times. Prints the medians, TCP retransmits and the
packets the kernel dropped at the dataplane's TUN queue. With `--policy-rules N`
(100 by default) each test also runs to the lan host behind the gateway's NAT,
interleaved: from the first client, whose group allows the lan whole, and from
a second one whose access policy has N rules and allows the lan host's port
5201 only, so the two are compared within one run.
"""

import argparse
import statistics
import sys

from noise_bench import TUNNEL_GATEWAY, gateway_with_iperf, gbps, iperf, save_results

from netlab import metrics
from netlab.gateway import LAN_HOST, GatewayLab

DIRECTIONS = (("upload", ()), ("download", ("-R",)))


def tun_queue_drops(gateway: GatewayLab) -> float:
    return metrics.total(
        gateway.scrape(), "pushgate_dataplane_kernel_drops_total", where="tun_queue"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append RESULT lines here")
    parser.add_argument(
        "--policy-rules",
        type=int,
        default=100,
        help="also run each test from a second client whose access policy has this many"
        " rules, interleaved (0: not)",
    )
    args = parser.parse_args(argv)
    lines = []
    # (client, target, scenario suffix): the gateway's address as before; with a
    # policy, the lan host from a client allowed the lan whole and from one whose
    # policy has --policy-rules rules
    clients = [(0, TUNNEL_GATEWAY, "")]
    if args.policy_rules:
        clients += [(0, LAN_HOST, "-lan"), (1, LAN_HOST, f"-lan-policy{args.policy_rules}")]
    with gateway_with_iperf("pgdir", policy_rules=args.policy_rules) as gateway:
        for run in range(1, args.repeats + 1):
            for name, extra in DIRECTIONS:
                for client, target, suffix in clients:
                    dropped = tun_queue_drops(gateway)
                    end = iperf(gateway, args.seconds, *extra, client=client, to=target)
                    dropped = tun_queue_drops(gateway) - dropped
                    line = (
                        f"RESULT scenario=pushgate-{name}{suffix} run={run} "
                        f"tcp_gbps={gbps(end):.3f} "
                        f"retransmits={end['sum_sent'].get('retransmits', 0)} "
                        f"tun_queue_drops={dropped:.0f}"
                    )
                    print(line, file=sys.stderr, flush=True)
                    lines.append(line)
    fields = save_results(lines, args.results)
    rates = {}
    for name, _ in DIRECTIONS:
        for _, _, suffix in clients:
            scenario = f"{name}{suffix}"
            mine = [f for f in fields if f["scenario"] == f"pushgate-{scenario}"]
            rates[scenario] = statistics.median(float(f["tcp_gbps"]) for f in mine)
            retransmits = statistics.median(int(f["retransmits"]) for f in mine)
            drops = sum(int(f["tun_queue_drops"]) for f in mine)
            print(
                f"single-stream TCP {scenario:8s} {rates[scenario]:.2f} Gbit/s (median of "
                f"{len(mine)}; median retransmits {retransmits:.0f}, dataplane TUN queue drops "
                f"{drops})"
            )
    print(f"download / upload: {rates['download'] / rates['upload']:.2f}x")
    if args.policy_rules:
        for name, _ in DIRECTIONS:
            ratio = rates[f"{name}-lan-policy{args.policy_rules}"] / rates[f"{name}-lan"]
            print(
                f"{name} to the lan host, {args.policy_rules}-rule access policy / the lan"
                f" allowed whole: {ratio:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
