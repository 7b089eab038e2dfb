"""Fairness between clients at a gateway: a UDP flood against TCP, and two TCP flows.

    python bench/fairness_bench.py [--seconds 5] [--repeats 3] [--direction both]
                                   [--results FILE]

A whole gateway in namespaces (netlab.gateway: auth, dataplane, two clients,
198.18.0.0/15 only), each client a session of its own, an iperf3 server on the
gateway's tunnel address for each (ports 5201 and 5202). For the first two
tests client 0 (the flood's sender) runs on CPU 0 and everything else on CPU 1,
so that the flood's own cost, which a real client pays on its own machine,
takes no CPU from the gateway; the pair runs on both. Interleaved,
`--repeats` times:

- `tcp-alone`: client 1's single-stream TCP upload, alone: what the gateway
  carries for one flow (the bottleneck is the dataplane's CPU);
- `tcp-vs-flood`: the same TCP flow while client 0 sends UDP as fast as
  iperf3 can (`-u -b 0`, 1200-byte datagrams). The figure is the TCP flow's
  throughput as a share of `tcp-alone` (target: >= 0.40), and its share of all
  the bits the gateway carried in that time;
- `tcp-pair`: both clients' single-stream TCP uploads at once; the figure is
  Jain's fairness index of the two throughputs (target: >= 0.9).

With `--direction download` (or `both`, the default) the same three tests run the
other way (iperf3 `-R`): the servers send, the dataplane reads the flood and the
TCP flow from its TUN, and the flood's sender (server 0) runs on CPU 0 with its
receiver, client 0, as a host on the lan and a client's own machine would. The
RESULT lines say `direction=upload` or `download`.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from noise_bench import TUNNEL_GATEWAY, save_results

from dataplane.metrics import INBOUND, OUTBOUND
from netlab import Lab, metrics
from netlab.gateway import GatewayLab

PORTS = (5201, 5202)  # client i's iperf3 server port
FLOOD_DATAGRAM = 1200  # bytes of UDP payload: one tunnel packet, never a fragment


@contextlib.contextmanager
def two_client_gateway(lab_name: str):
    with tempfile.TemporaryDirectory() as workdir, Lab(lab_name) as lab:
        offered = [f"{proto} {TUNNEL_GATEWAY}:{port}" for port in PORTS for proto in ("tcp", "udp")]
        gateway = GatewayLab(
            lab,
            workdir,
            clients=2,
            routes=(f"{TUNNEL_GATEWAY}/32",),
            offered_services=tuple(offered),
        )
        for user in ("bench0", "bench1"):
            gateway.add_user(user)
        gateway.start()
        gateway.connect(0, "bench0")
        gateway.connect(1, "bench1")
        servers = [
            lab.start(
                gateway.gw,
                ["iperf3", "-s", "-B", TUNNEL_GATEWAY, "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for port in PORTS
        ]
        time.sleep(0.5)
        try:
            yield gateway, servers
        finally:
            for server in servers:
                lab.stop(server)


def pin(pid: int, cpus: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True)


def pin_flood_apart(gateway: GatewayLab, servers, apart: bool, download: bool) -> None:
    """With `apart`, the flood's ends outside the gateway on CPU 0 (client 0, and for
    a download its sender, iperf3 server 0) and the gateway, client 1 and the other
    iperf3 servers on CPU 1: the flood's own cost, which a real client and a lan
    host pay on their own machines, takes no CPU from the gateway. Else all on both."""
    flood_ends = [gateway.client_processes[0], *(servers[:1] if download else ())]
    others = [gateway.dataplane, gateway.client_processes[1], *servers[1 if download else 0 :]]
    for process in flood_ends:
        pin(process.pid, "0" if apart else "0-1")
    for process in others:
        pin(process.pid, "1" if apart else "0-1")


def start_iperf(gateway: GatewayLab, client: int, seconds: float, *extra: str, cpus="0-1"):
    port = str(PORTS[client])
    return gateway.lab.start(
        gateway.clients[client],
        [
            "taskset",
            "-c",
            cpus,
            "iperf3",
            "-c",
            TUNNEL_GATEWAY,
            "-p",
            port,
            "-t",
            str(seconds),
            "-J",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def finished(process, seconds: float) -> dict:
    out, _ = process.communicate(timeout=seconds + 30)
    return json.loads(out)["end"]


def tcp_bps(end: dict) -> float:
    return end["sum_received"]["bits_per_second"]


def udp_received_bps(end: dict) -> float:
    """What reached the iperf3 server: the packets sent less those it found lost."""
    total = end["sum"]
    received = total["packets"] - total["lost_packets"]
    return received * FLOOD_DATAGRAM * 8 / total["seconds"]


def dataplane_drops(gateway: GatewayLab, download: bool) -> dict[str, float]:
    """Drops by reason in the flood's direction, and the kernel's where that
    direction enters the dataplane: the push socket's receive buffer, or the TUN's
    queue."""
    scrape = gateway.scrape()
    where = "tun_queue" if download else "udp_receive_buffer"
    found = {where: metrics.total(scrape, "pushgate_dataplane_kernel_drops_total", where=where)}
    direction = OUTBOUND if download else INBOUND
    for (name, labels), value in scrape.items():
        labels = dict(labels)
        if name == "pushgate_dataplane_drops_total" and labels.get("direction") == direction:
            found[labels["reason"]] = found.get(labels["reason"], 0) + value
    return found


def cpu_seconds(pid: int) -> float:
    """User and system time of a process so far (/proc/PID/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(gateway: GatewayLab) -> dict[str, float]:
    """CPU seconds so far of the dataplane and of each client."""
    found = {"dataplane": cpu_seconds(gateway.dataplane.pid)}
    for index, process in gateway.client_processes.items():
        found[f"client{index}"] = cpu_seconds(process.pid)
    return found


def jain(rates: list[float]) -> float:
    return sum(rates) ** 2 / (len(rates) * sum(rate * rate for rate in rates))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--direction", choices=("upload", "download", "both"), default="both")
    parser.add_argument("--results", help="append RESULT lines here")
    args = parser.parse_args(argv)
    seconds = args.seconds
    lines = []

    def result(**fields) -> None:
        line = "RESULT " + " ".join(f"{key}={value}" for key, value in fields.items())
        print(line, file=sys.stderr, flush=True)
        lines.append(line)

    directions = ("upload", "download") if args.direction == "both" else (args.direction,)
    with two_client_gateway("pgfair") as (gateway, servers):
        for run in range(1, args.repeats + 1):
            for direction in directions:
                download = direction == "download"
                reverse = ("-R",) if download else ()
                pin_flood_apart(gateway, servers, True, download)
                alone = tcp_bps(
                    finished(
                        start_iperf(gateway, 1, seconds, "-O", "1", *reverse, cpus="1"), seconds
                    )
                )
                result(
                    scenario="tcp-alone",
                    direction=direction,
                    run=run,
                    tcp_gbps=f"{alone / 1e9:.3f}",
                )

                # the flood starts first and ends after the TCP test
                drops_before, cpu_before = dataplane_drops(gateway, download), busy(gateway)
                flood = start_iperf(
                    gateway, 0, seconds + 2, "-u", "-b", "0", "-l", str(FLOOD_DATAGRAM), *reverse
                )
                time.sleep(1)
                tcp = tcp_bps(
                    finished(start_iperf(gateway, 1, seconds, "-O", "1", *reverse), seconds)
                )
                udp_end = finished(flood, seconds + 2)
                cpu = {k: (v - cpu_before[k]) / (seconds + 2) for k, v in busy(gateway).items()}
                udp = udp_received_bps(udp_end)
                drops = dataplane_drops(gateway, download)
                drops = {k: v - drops_before.get(k, 0) for k, v in drops.items()}
                result(
                    scenario="tcp-vs-flood",
                    direction=direction,
                    run=run,
                    tcp_gbps=f"{tcp / 1e9:.3f}",
                    udp_gbps=f"{udp / 1e9:.3f}",
                    tcp_keeps=f"{tcp / alone:.3f}",
                    tcp_share=f"{tcp / (tcp + udp):.3f}",
                    udp_sent_gbps=f"{udp_end['sum']['bits_per_second'] / 1e9:.3f}",
                    cpu=",".join(f"{k}:{v:.2f}" for k, v in cpu.items()),
                    drops=",".join(f"{k}:{v:.0f}" for k, v in sorted(drops.items()) if v) or "-",
                )

                pin_flood_apart(gateway, servers, False, download)
                pair = [
                    start_iperf(gateway, client, seconds, "-O", "1", *reverse) for client in (0, 1)
                ]
                rates = [tcp_bps(finished(process, seconds)) for process in pair]
                result(
                    scenario="tcp-pair",
                    direction=direction,
                    run=run,
                    tcp0_gbps=f"{rates[0] / 1e9:.3f}",
                    tcp1_gbps=f"{rates[1] / 1e9:.3f}",
                    jain=f"{jain(rates):.3f}",
                )
    fields = save_results(lines, args.results)

    def median(direction: str, scenario: str, name: str) -> float:
        return statistics.median(
            float(f[name])
            for f in fields
            if f["scenario"] == scenario and f["direction"] == direction
        )

    for direction in directions:
        print(
            f"{direction}: TCP alone {median(direction, 'tcp-alone', 'tcp_gbps'):.2f} Gbit/s;"
            f" against a UDP flood {median(direction, 'tcp-vs-flood', 'tcp_gbps'):.2f} Gbit/s"
            f" (the flood {median(direction, 'tcp-vs-flood', 'udp_gbps'):.2f} Gbit/s"
            " delivered): the TCP flow keeps"
            f" {median(direction, 'tcp-vs-flood', 'tcp_keeps'):.2f} of its rate alone"
            " (target >= 0.40) and has"
            f" {median(direction, 'tcp-vs-flood', 'tcp_share'):.2f} of what the gateway"
            f" carried (medians of {args.repeats})"
        )
        print(
            f"{direction}: two TCP flows: {median(direction, 'tcp-pair', 'tcp0_gbps'):.2f} and"
            f" {median(direction, 'tcp-pair', 'tcp1_gbps'):.2f} Gbit/s, Jain's index"
            f" {median(direction, 'tcp-pair', 'jain'):.3f} (target >= 0.9)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
