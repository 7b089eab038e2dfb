"""End to end: an ended session's NAT state does not follow its address to the next user.

A whole gateway in namespaces (netlab.gateway) with the smallest tunnel network the
config takes (198.19.0.0/29: five client addresses), four of them held by other
sessions, so bob must get the address alice just freed. Alice holds a
UDP flow through the gateway's masquerade that the lan host keeps sending on; she
logs out, bob logs in with her address, and not one packet of her flow enters bob's
tunnel: the dataplane deleted the flow's conntrack entry when her session ended.
"""

import re
import subprocess
import sys
import time

import pytest

from netlab import Lab, http_get, metrics, wait_for
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, GatewayLab

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

FLOW_PORT = 5003
ADDRESS = "198.19.0.2"  # alice's; the other four client addresses of the /29 are held
HELD = 4

# Logs in argv[5] times and keeps the sessions (they hold their addresses till expiry).
HOLD_ADDRESSES = """
import sys, grpc
from pushgate_api import auth_pb2, auth_pb2_grpc
target, ca, user, password_file, count = sys.argv[1:]
with open(ca, "rb") as handle:
    credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
with open(password_file) as handle:
    password = handle.read().strip()
with grpc.secure_channel(target, credentials) as channel:
    stub = auth_pb2_grpc.AuthStub(channel)
    for _ in range(int(count)):
        stub.Login(auth_pb2.LoginRequest(username=user, password=password), timeout=10)
"""

# The lan host: after a datagram from a peer, send to that peer every 20 ms (so the
# flow's conntrack entry stays assured and fresh), for at most a minute.
LAN_SENDER = f"""
import select, socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{LAN_HOST}", {FLOW_PORT}))
peers, end = set(), time.monotonic() + 60
while time.monotonic() < end:
    if select.select([sock], [], [], 0.02)[0]:
        peers.add(sock.recvfrom(2048)[1])
    for peer in peers:
        sock.sendto(b"alice's flow", peer)
"""

# Alice's side of the flow: one datagram out through the tunnel, then hold the socket.
ALICE_OPENS = f"""
import socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.sendto(b"hello", ("{LAN_HOST}", {FLOW_PORT}))
time.sleep(60)
"""


def counter(name: str, where: str) -> str:
    """An nftables table counting the flow's packets from the lan host `where`."""
    return (
        f"table inet {name} {{\n"
        f"  chain pre {{\n"
        f"    type filter hook prerouting priority -300; policy accept;\n"
        f"    {where} ip saddr {LAN_HOST} udp sport {FLOW_PORT} counter\n"
        f"  }}\n}}\n"
    )


def counted(gw: GatewayLab, ns: str, name: str) -> int:
    listing = gw.lab.exec(ns, ["nft", "list", "table", "inet", name]).stdout
    return int(re.search(r"counter packets (\d+)", listing).group(1))


@pytest.fixture
def gateway(tmp_path):
    with Lab("pgreuse") as lab:
        gw = GatewayLab(lab, str(tmp_path), clients=2, keepalive_seconds=2)
        with open(gw.config) as handle:
            text = handle.read()
        with open(gw.config, "w") as handle:
            text = text.replace('"198.19.0.0/24"', '"198.19.0.0/29"')
            handle.write(
                re.sub(r"(?m)^max_sessions_per_user = .*$", f"max_sessions_per_user = {HELD}", text)
            )
        gw.add_user("alice")
        gw.add_user("bob")
        gw.add_user("holder")
        gw.start()
        yield gw


def test_a_freed_address_brings_none_of_its_nat_state_to_the_next_user(gateway):
    gw = gateway
    alice_ns, bob_ns = gw.clients
    gw.lab.exec(alice_ns, ["nft", "-f", "-"], input=counter("pgflow", 'iifname "pgc0"'))
    gw.lab.exec(bob_ns, ["nft", "-f", "-"], input=counter("pgflow", 'iifname "pgc1"'))
    gw.lab.exec(gw.gw, ["nft", "-f", "-"], input=counter("pgflow", f'iifname "{gw.lan_dev}"'))
    gw.lab.start(gw.lan, [sys.executable, "-c", LAN_SENDER], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # the sender's socket is bound

    gw.connect(0, "alice")
    assert f"{ADDRESS}/29" in gw.status(0)["tunnel"]
    hold = [sys.executable, "-c", HOLD_ADDRESSES, f"{GATEWAY}:{AUTH_PORT}", gw.ca, "holder"]
    gw.lab.exec(bob_ns, [*hold, gw.password_file, str(HELD)])
    gw.lab.start(alice_ns, [sys.executable, "-c", ALICE_OPENS])
    wait_for(
        lambda: counted(gw, alice_ns, "pgflow") >= 20,
        10,
        what="the lan host's flow to reach alice through the NAT",
    )

    gw.disconnect(0)  # logout: the session ends in the auth service and the dataplane
    gw.connect(1, "bob")
    assert f"{ADDRESS}/29" in gw.status(1)["tunnel"]  # alice's address, freed just now
    sent_before = counted(gw, gw.gw, "pgflow")
    time.sleep(2)
    assert counted(gw, gw.gw, "pgflow") >= sent_before + 50  # the lan host kept sending ...
    assert counted(gw, bob_ns, "pgflow") == 0  # ... and none of it reached bob
    assert gw.ping(1, LAN_HOST, count=2).returncode == 0  # bob's own traffic flows

    dataplane = gw.scrape()
    assert metrics.total(dataplane, "pushgate_dataplane_conntrack_cleaner_up") == 1
    assert metrics.total(dataplane, "pushgate_dataplane_conntrack_cleanups_total", result="ok") == 1
    assert (
        metrics.total(dataplane, "pushgate_dataplane_conntrack_cleanups_total", result="failed")
        == 0
    )
    assert metrics.total(dataplane, "pushgate_dataplane_conntrack_entries_deleted_total") >= 1
    auth = metrics.parse(http_get(gw.gw, 9101, "/metrics").decode())  # [auth] metrics_listen
    handed_out = "pushgate_auth_address_allocations_total"
    assert metrics.total(auth, handed_out, kind="quarantined") == 1  # no other address was free
