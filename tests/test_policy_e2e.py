"""Access policy end to end (issue 18): groups in the gateway config decide what
each user reaches, enforced in the dataplane, changed live by a reload.

A whole gateway in namespaces (netlab.gateway) with two lan hosts: 198.18.2.2
(behind NAT) and 198.18.3.2 (routed). Group `eng` may reach lan host 1, `sales`
lan host 2; both groups route everything into the tunnel, so every probe reaches
the dataplane and is its decision. Alice is in eng, bob in sales.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from netlab import Lab, metrics, wait_for
from netlab.gateway import LAN2_HOST, LAN_GATEWAY, LAN_HOST, METRICS_PORT, GatewayLab, tool

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

TUNNEL_GATEWAY = "198.19.0.1"
PROBES = 10  # UDP datagrams per refused target

GROUPS = """{everyone}
[groups.eng]
allow = ["{eng}/32"]
routes = ["0.0.0.0/0"]

[groups.sales]
allow = ["{sales}/32"]
routes = ["0.0.0.0/0"]
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

# Prints "connected" or why not, for a TCP connect from the namespace it runs in.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
    print("connected")
except OSError as error:
    print(type(error).__name__)
"""


def write_groups(gw: GatewayLab, eng: str, sales: str, everyone: str = "") -> None:
    with open(gw.config) as handle:
        text = handle.read()
    base = text.split("\n[groups.", 1)[0].rstrip("\n") + "\n"
    with open(gw.config + ".new", "w") as handle:
        handle.write(base + GROUPS.format(eng=eng, sales=sales, everyone=everyone))
    os.replace(gw.config + ".new", gw.config)


def admin(gw: GatewayLab, *args: str) -> None:
    subprocess.run(
        [tool("pushgate-admin"), *args, "--config", gw.config], check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("policy"))
    with Lab("pgpdp") as lab:
        gw = GatewayLab(
            lab, workdir, clients=2, lan_hosts=2, keepalive_seconds=2, metrics_host="0.0.0.0"
        )
        write_groups(gw, eng=LAN_HOST, sales=LAN2_HOST)
        gw.add_user("alice")
        gw.add_user("bob")
        admin(gw, "group", "add", "eng", "alice")
        admin(gw, "group", "add", "sales", "bob")
        gw.start()
        gw.connect(0, "alice")
        gw.connect(1, "bob")
        yield gw


def tunnel(gw: GatewayLab, index: int) -> tuple[str, str]:
    """(tunnel address, session id) of client `index`, from its status."""
    # "tunnel:  pgc0 198.19.0.2/24  session 0x01020304 key epoch 0"
    words = gw.status(index)["tunnel"].split()
    return words[1].split("/")[0], words[3]


def dropped(gw: GatewayLab, reason: str) -> float:
    return metrics.total(
        gw.scrape(), "pushgate_dataplane_drops_total", direction="inbound", reason=reason
    )


def send(gw: GatewayLab, index: int, *targets: str) -> None:
    gw.lab.exec(gw.clients[index], [sys.executable, "-c", SEND, str(PROBES), *targets])


def pings(gw: GatewayLab, index: int, address: str, count: int) -> int:
    """Echo replies client `index` got for `count` requests (sent 0.2 s apart)."""
    result = gw.ping(index, address, count)
    for line in result.stdout.splitlines():
        if "packets transmitted" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(result.stdout + result.stderr)


def test_each_group_reaches_its_lan_host_only_and_every_refusal_is_counted(gateway):
    alice, bob = tunnel(gateway, 0)[0], tunnel(gateway, 1)[0]
    denied, forbidden = dropped(gateway, "policy_denied"), dropped(gateway, "forbidden_destination")
    # what each may reach (echo replies come back from the network unchecked)
    assert pings(gateway, 0, LAN_HOST, 3) == 3
    assert pings(gateway, 1, LAN2_HOST, 3) == 3
    # what each may not: the other's lan host, the other client, ping and UDP
    refused = 0
    for index, other_lan, other_client in ((0, LAN2_HOST, bob), (1, LAN_HOST, alice)):
        assert pings(gateway, index, other_lan, 2) == 0
        send(gateway, index, f"{other_lan}:7", f"{other_client}:7")
        assert pings(gateway, index, other_client, 2) == 0
        refused += 2 + 2 * PROBES + 2
    # the gateway's metrics port, on its lan side and its tunnel address: forbidden
    # before any policy (the service is there: the lan host reaches it)
    for index in (0, 1):
        send(gateway, index, f"{LAN_GATEWAY}:{METRICS_PORT}", f"{TUNNEL_GATEWAY}:{METRICS_PORT}")
    connect = [sys.executable, "-c", CONNECT, LAN_GATEWAY, str(METRICS_PORT)]
    assert gateway.lab.exec(gateway.lan, connect).stdout.strip() == "connected"
    for index in (0, 1):
        assert gateway.lab.exec(gateway.clients[index], connect).stdout.strip() == "TimeoutError"

    wait_for(
        lambda: dropped(gateway, "policy_denied") == denied + refused or None,
        5,
        what=f"{refused} policy_denied drops",
    )
    time.sleep(0.5)  # nothing else arrives late
    assert dropped(gateway, "policy_denied") == denied + refused
    assert dropped(gateway, "forbidden_destination") >= forbidden + 2 * 2 * PROBES
    samples = gateway.scrape()
    received = metrics.total(samples, "pushgate_dataplane_datagrams_received_total")
    delivered = metrics.total(samples, "pushgate_dataplane_datagrams_delivered_total")
    drops = metrics.total(samples, "pushgate_dataplane_drops_total", direction="inbound")
    assert received == delivered + drops


def test_editing_a_groups_rules_and_a_reload_flips_live_sessions_within_a_second(gateway):
    session_before = tunnel(gateway, 0)[1]
    installs = metrics.total(gateway.scrape(), "pushgate_dataplane_session_installs_total")
    assert pings(gateway, 0, LAN_HOST, 1) == 1 and pings(gateway, 0, LAN2_HOST, 1) == 0

    write_groups(gateway, eng=LAN2_HOST, sales=LAN2_HOST)
    reloaded = time.monotonic()
    os.kill(gateway.auth.pid, signal.SIGHUP)
    flipped = None
    while time.monotonic() - reloaded < 5:
        if (
            gateway.lab.exec(
                gateway.clients[0], ["ping", "-c", "1", "-W", "0.2", LAN2_HOST], check=False
            ).returncode
            == 0
        ):
            flipped = time.monotonic() - reloaded
            break
    print(f"eng reached lan host 2 {flipped} s after the SIGHUP")
    assert flipped is not None and flipped <= 1.0, flipped

    denied = dropped(gateway, "policy_denied")
    assert pings(gateway, 0, LAN_HOST, 2) == 0  # and lost lan host 1
    wait_for(
        lambda: dropped(gateway, "policy_denied") == denied + 2 or None,
        5,
        what="the two refused pings counted",
    )
    assert pings(gateway, 1, LAN2_HOST, 1) == 1  # sales unchanged
    # the same session throughout: no new login, nothing re-installed
    assert tunnel(gateway, 0)[1] == session_before
    assert gateway.status(0)["state"] == "up"
    assert metrics.total(gateway.scrape(), "pushgate_dataplane_session_installs_total") == installs


def test_a_rule_for_the_tunnel_network_lets_clients_reach_each_other(gateway):
    """Group `all` (every user) allows ICMP to the tunnel network: alice and bob
    ping each other through the gateway (hub), and only ICMP."""
    alice, bob = tunnel(gateway, 0)[0], tunnel(gateway, 1)[0]
    assert pings(gateway, 0, bob, 1) == 0
    write_groups(
        gateway,
        eng=LAN_HOST,
        sales=LAN2_HOST,
        everyone='\n[groups.all]\nallow = ["198.19.0.0/24 icmp"]\n',
    )
    os.kill(gateway.auth.pid, signal.SIGHUP)
    wait_for(lambda: pings(gateway, 0, bob, 1) == 1 or None, 5, what="alice to reach bob")
    before = metrics.total(
        gateway.scrape(), "pushgate_dataplane_packets_total", direction="outbound"
    )
    assert pings(gateway, 1, alice, 3) == 3
    after = metrics.total(
        gateway.scrape(), "pushgate_dataplane_packets_total", direction="outbound"
    )
    assert after >= before + 6  # each request and reply sealed for the other client
    denied = dropped(gateway, "policy_denied")
    send(gateway, 0, f"{bob}:7")  # UDP is still refused
    wait_for(
        lambda: dropped(gateway, "policy_denied") == denied + PROBES or None,
        5,
        what="the UDP probes refused",
    )
