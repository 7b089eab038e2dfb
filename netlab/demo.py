"""`make demo`: the whole gateway on this host, in network namespaces.

Builds netlab.gateway's topology (gateway, one client, a lan host behind the
gateway's NAT), connects the client with a full tunnel, pings the lan host,
transfers a file over TCP and checks its hash, prints a summary and removes
everything it created.
"""

import os
import shutil
import sys
import tempfile
import time

from . import Lab, metrics
from .gateway import LAN_HOST, GatewayLab

TRANSFER_BYTES = 50 * 1024 * 1024
TRANSFER_SEED = 2026


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines())


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="pushgate-demo-")
    try:
        with Lab("pgdemo") as lab:
            return run(lab, workdir)
    finally:
        if os.environ.get("PUSHGATE_DEMO_KEEP"):
            print(f"(logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(lab: Lab, workdir: str) -> int:
    _say("namespaces: gateway, client, lan host (addresses from 198.18.0.0/15 only)")
    gateway = GatewayLab(lab, workdir)
    _say("gateway initialised (CA, server certificate, config); adding user 'demo'")
    gateway.add_user("demo")
    _say("starting pushgate-auth and pushgate-dataplane; NAT towards the lan")
    gateway.start()
    _say("connecting pushgate-client (full tunnel)")
    gateway.connect(0, "demo")
    client = gateway.clients[0]

    _say(f"ping {LAN_HOST} (behind the gateway) through the tunnel")
    ping = gateway.ping(0, LAN_HOST, count=10)
    print(_indent("\n".join(ping.stdout.strip().splitlines()[-2:])))

    _say(f"TCP transfer of {TRANSFER_BYTES >> 20} MiB from the lan host, checked with SHA-256")
    gateway.serve_transfers(TRANSFER_BYTES, TRANSFER_SEED)
    time.sleep(0.5)
    ok, rate = gateway.fetched(gateway.fetch(0))
    print(
        f"    {TRANSFER_BYTES} bytes at {rate:.0f} Mbit/s, "
        f"sha256 {'matches' if ok else 'DOES NOT MATCH'}"
    )

    _say("pushgate-client status")
    print(_indent(lab.exec(client, [*gateway.client_command(0), "status"]).stdout))
    _say("dataplane metrics")
    print(_indent(summarise(gateway.scrape())))
    _say("disconnecting; removing namespaces and processes")
    gateway.disconnect(0)
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def summarise(samples) -> str:
    def value(name: str, **labels: str) -> int:
        return int(metrics.total(samples, name, **labels))

    prefix = "pushgate_dataplane_"
    lines = [
        f"datagrams received {value(prefix + 'datagrams_received_total')}, delivered "
        f"{value(prefix + 'datagrams_delivered_total')}",
        f"packets inbound {value(prefix + 'packets_total', direction='inbound')}, "
        f"outbound {value(prefix + 'packets_total', direction='outbound')}; bytes inbound "
        f"{value(prefix + 'bytes_total', direction='inbound')}, "
        f"outbound {value(prefix + 'bytes_total', direction='outbound')}",
        f"sessions active {value(prefix + 'sessions', state='active')}, "
        f"installs {value(prefix + 'session_installs_total')}",
    ]
    drops = {
        f"{dict(labels)['direction']}/{dict(labels)['reason']}": int(v)
        for (name, labels), v in samples.items()
        if name == prefix + "drops_total" and v
    }
    lines.append("drops: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
    lag_count = metrics.total(samples, prefix + "loop_lag_seconds_count")
    fast = metrics.total(samples, prefix + "loop_lag_seconds_bucket", le="0.01")
    lines.append(f"receive loop lag <= 10 ms in {fast:.0f} of {lag_count:.0f} samples")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
