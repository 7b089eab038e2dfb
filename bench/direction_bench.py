"""Single-stream TCP through pushgate in both directions: upload and download.

    python bench/direction_bench.py [--seconds 5] [--repeats 3] [--results FILE]

The shared harness (make bench-vpn) measures from the client towards the
gateway only, but a remote-access user mostly downloads: the two directions
take different paths (the dataplane reads its TUN and seals, the client opens
and writes its TUN). A whole gateway in namespaces (netlab.gateway, 198.18.0.0/15
only); iperf3 from the client to the gateway's tunnel address and back (-R),
interleaved `--repeats` times. Prints the medians, TCP retransmits and the
packets the kernel dropped at the dataplane's TUN queue.
"""

import argparse
import statistics
import sys

from noise_bench import gateway_with_iperf, gbps, iperf, save_results

from netlab import metrics
from netlab.gateway import GatewayLab

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
    args = parser.parse_args(argv)
    lines = []
    with gateway_with_iperf("pgdir") as gateway:
        for run in range(1, args.repeats + 1):
            for name, extra in DIRECTIONS:
                dropped = tun_queue_drops(gateway)
                end = iperf(gateway, args.seconds, *extra)
                dropped = tun_queue_drops(gateway) - dropped
                line = (
                    f"RESULT scenario=pushgate-{name} run={run} tcp_gbps={gbps(end):.3f} "
                    f"retransmits={end['sum_sent'].get('retransmits', 0)} "
                    f"tun_queue_drops={dropped:.0f}"
                )
                print(line, file=sys.stderr, flush=True)
                lines.append(line)
    fields = save_results(lines, args.results)
    rates = {}
    for name, _ in DIRECTIONS:
        mine = [f for f in fields if f["scenario"] == f"pushgate-{name}"]
        rates[name] = statistics.median(float(f["tcp_gbps"]) for f in mine)
        retransmits = statistics.median(int(f["retransmits"]) for f in mine)
        drops = sum(int(f["tun_queue_drops"]) for f in mine)
        print(
            f"single-stream TCP {name:8s} {rates[name]:.2f} Gbit/s (median of {len(mine)}; "
            f"median retransmits {retransmits:.0f}, dataplane TUN queue drops {drops})"
        )
    print(f"download / upload: {rates['download'] / rates['upload']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
