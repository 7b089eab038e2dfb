"""Idle round-trip time through the tunnel, per event loop (issue 23, item 5).

A gateway and one client in namespaces (netlab/gateway.py); the client pings the
lan host through the tunnel every 0.2 s, nothing else runs. The same ping to the
gateway's own address outside the tunnel is the baseline: the difference is what the
tunnel adds (four wake-ups: client TUN -> UDP, dataplane UDP -> TUN, and back).
Dataplane and client run on asyncio's loop, then on uvloop (PUSHGATE_EVENT_LOOP,
pushgate_io/event_loop.py). Medians over RUNS runs of each run's mean RTT.
"""

import os
import re
import statistics
import sys
import tempfile

from netlab import Lab
from netlab.gateway import GATEWAY, LAN_HOST, GatewayLab
from pushgate_io.event_loop import EVENT_LOOP_ENVIRONMENT

RUNS = int(os.environ.get("IDLE_RUNS", "3"))
PINGS = 50


def mean_rtt_ms(lab: Lab, ns: str, address: str) -> float:
    out = lab.exec(ns, ["ping", "-q", "-c", str(PINGS), "-i", "0.2", address]).stdout
    return float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1))


def one_run(loop: str) -> tuple[float, float]:
    """(through the tunnel, to the gateway outside it), mean ms."""
    os.environ[EVENT_LOOP_ENVIRONMENT] = loop
    with tempfile.TemporaryDirectory() as directory, Lab("pgidle") as lab:
        gw = GatewayLab(lab, directory, clients=1, routes=("198.18.2.0/24",))
        gw.add_user("alice")
        gw.start()
        gw.connect(0, "alice")
        mean_rtt_ms(lab, gw.clients[0], LAN_HOST)  # warm: ARP, conntrack
        return mean_rtt_ms(lab, gw.clients[0], LAN_HOST), mean_rtt_ms(lab, gw.clients[0], GATEWAY)


def main() -> int:
    print(f"idle RTT: ping every 0.2 s, {PINGS} per run, medians of {RUNS} runs")
    print("| event loop | through the tunnel ms | outside it ms | the tunnel adds ms |")
    print("| --- | --- | --- | --- |")
    for loop in ("asyncio", "uvloop"):
        runs = [one_run(loop) for _ in range(RUNS)]
        tunnel = statistics.median(r[0] for r in runs)
        outside = statistics.median(r[1] for r in runs)
        print(f"| {loop} | {tunnel:.3f} | {outside:.3f} | {tunnel - outside:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
