"""Nothing inside the tunnel reaches the gateway's own services, and /metrics cannot
stall the packet loop: a whole gateway in namespaces (netlab.gateway) with its
metrics on 0.0.0.0, as a compose stack has them."""

import json
import re
import subprocess
import sys

import pytest

from netlab import Lab, metrics
from netlab.gateway import LAN_GATEWAY, LAN_HOST, METRICS_PORT, GatewayLab

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

TUNNEL_GATEWAY = "198.19.0.1"
METADATA = "169.254.169.254"  # link-local: never configured anywhere, only refused

# Prints "connected" or why not, for a TCP connect from the namespace it runs in.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""

# UDP datagrams to each HOST:PORT given, `count` each.
SEND = """
import socket, sys
count = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    for _ in range(count):
        s.sendto(b"probe", (host, int(port)))
"""

# From inside the gateway: hold HOLD connections to /metrics open with half a
# request; which did the server close at once, and did it close the rest by its
# deadline? Then scrape flat out from FLOODERS threads for FLOOD seconds.
HOLD_AND_FLOOD = """
import json, select, socket, sys, threading, time
port, hold, flooders, flood = (int(a) for a in sys.argv[1:5])
held = []
for _ in range(hold):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.0\\r\\n")  # and never the blank line
    held.append(s)

def closed(sockets, wait):
    readable = select.select(sockets, [], [], wait)[0]
    out = []
    for s in readable:
        try:
            if s.recv(1) == b"":
                out.append(s)
        except ConnectionResetError:
            out.append(s)
    return out

time.sleep(1.0)
at_once = closed(held, 0)
rest = [s for s in held if s not in at_once]
deadline = time.monotonic() + 6
later = []
while len(later) < len(rest) and time.monotonic() < deadline:
    later += [s for s in closed([s for s in rest if s not in later], 0.2) if s not in later]
results = {"200": 0, "503": 0, "refused": 0}
lock = threading.Lock()

def scrape_flat_out():
    end = time.monotonic() + flood
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\\r\\n\\r\\n")
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            status = answer.split(b" ", 2)[1].decode() if answer else "refused"
        except OSError:
            status = "refused"
        with lock:
            results[status] = results.get(status, 0) + 1

threads = [threading.Thread(target=scrape_flat_out) for _ in range(flooders)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"closed_at_once": len(at_once), "closed_by_deadline": len(later),
                  "held": len(rest), "scrapes": results}))
"""

HOLD = 200


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("services"))
    with Lab("pgsvc") as lab:
        gw = GatewayLab(lab, workdir, clients=1, keepalive_seconds=2, metrics_host="0.0.0.0")
        gw.add_user("alice")
        gw.start()
        gw.connect(0, "alice")
        yield gw


def forbidden(gw: GatewayLab) -> float:
    return metrics.total(
        gw.scrape(),
        "pushgate_dataplane_drops_total",
        direction="inbound",
        reason="forbidden_destination",
    )


def connect(gw: GatewayLab, ns: str, host: str, port: int) -> str:
    return gw.lab.exec(ns, [sys.executable, "-c", CONNECT, host, str(port)]).stdout.strip()


def test_clients_reach_the_lan_but_not_the_gateway_host_or_link_local(gateway):
    client = gateway.clients[0]
    # the service is there, on every address of the gateway: the lan host reaches it
    assert connect(gateway, gateway.lan, LAN_GATEWAY, METRICS_PORT) == "connected"
    before = forbidden(gateway)
    targets = [
        f"{LAN_GATEWAY}:{METRICS_PORT}",  # the gateway's lan-side address
        f"{TUNNEL_GATEWAY}:{METRICS_PORT}",  # its tunnel address: only ping is offered
        f"{METADATA}:80",  # cloud metadata
    ]
    gateway.lab.exec(client, [sys.executable, "-c", SEND, "20", *targets])
    assert forbidden(gateway) == before + 20 * len(targets)
    for host in (LAN_GATEWAY, TUNNEL_GATEWAY, METADATA):
        assert connect(gateway, client, host, METRICS_PORT) == "TimeoutError", host
    assert forbidden(gateway) > before + 20 * len(targets)  # the SYNs, refused and counted
    # what is offered on purpose, and the network behind the gateway, still work
    assert gateway.ping(0, TUNNEL_GATEWAY, count=2).returncode == 0
    result = gateway.ping(0, LAN_HOST, count=3)
    assert " 0% packet loss" in result.stdout, result.stdout
    samples = gateway.scrape()
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    dropped = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + dropped


def lag_over_250ms(samples) -> float:
    return metrics.total(samples, "pushgate_dataplane_loop_lag_seconds_count") - metrics.total(
        samples, "pushgate_dataplane_loop_lag_seconds_bucket", le="0.25"
    )


def test_held_open_and_flooding_scrapes_do_not_stall_the_packet_loop(gateway):
    from dataplane.metrics_http import MAX_CONNECTIONS

    before = gateway.scrape()
    pings = gateway.lab.start(
        gateway.clients[0],
        ["ping", "-c", "60", "-i", "0.15", "-W", "2", LAN_HOST],
        stdout=subprocess.PIPE,
        text=True,
    )
    attack = gateway.lab.exec(
        gateway.gw,
        [sys.executable, "-c", HOLD_AND_FLOOD, str(METRICS_PORT), str(HOLD), "4", "3"],
        timeout=60,
    )
    report = json.loads(attack.stdout)
    out, _ = pings.communicate(timeout=60)
    after = gateway.scrape()
    print(report, out.splitlines()[-2:])
    # the cap: all but MAX_CONNECTIONS closed at once, and those by the request deadline
    assert report["closed_at_once"] == HOLD - MAX_CONNECTIONS, report
    assert report["closed_by_deadline"] == report["held"] == MAX_CONNECTIONS, report
    refused = "pushgate_dataplane_metrics_connections_refused_total"
    assert metrics.total(after, refused) - metrics.total(before, refused) >= HOLD - MAX_CONNECTIONS
    assert report["scrapes"]["200"] > 0, report  # it kept serving through the flood
    # the loop kept forwarding: pings answered, its timer never late by 250 ms
    received = int(re.search(r"(\d+) received", out).group(1))
    assert received >= 57, out
    assert lag_over_250ms(after) == lag_over_250ms(before)
