"""End to end (issue 20): the Linux client fails closed.

A gateway in namespaces (netlab.gateway) and one full-tunnel client whose underlay
is dual-stack (IPv6 from 2001:db8::/32) and has default routes of its own, as a
laptop on a LAN has: a leak would get out. An nftables counter on the client's
underlay (postrouting, after every filter: what the interface would carry) counts
every IP packet except to the gateway's two endpoints (auth TCP, dataplane UDP) and
IPv6 neighbour discovery / MLD (link housekeeping, which never carries data).

Probes from the client namespace in each phase: DNS queries to the LAN's resolvers
(the gateway's own underlay address, IPv4 and IPv6, and another on-link address:
the "LocalNet" case), UDP to a non-endpoint port of the gateway, UDP to the LAN
host behind the gateway (normally through the tunnel), and an IPv6 ping. In three
phases nothing may leave: the dataplane killed, a forced re-login while the account
is throttled (the TUN and its address stay: make before break), and after `kill -9`
of the client. After `disconnect` DNS and IPv6 work again.
"""

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from netlab import Lab, wait_for
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, GatewayLab

pytestmark = [pytest.mark.netns, pytest.mark.processes]

GATEWAY6 = "2001:db8:1::1"
CLIENT6 = "2001:db8:1::2"
LAN_RESOLVER = "198.18.1.3"  # another host on the client's LAN
THROTTLE_SECONDS = 20  # the account's block after its free failures

WATCH = """
table inet fclwatch {
  counter leaked {}
  chain post {
    type filter hook postrouting priority 500; policy accept;
    oifname != "%(dev)s" return
    ip daddr %(gw)s tcp dport %(auth)d return
    ip daddr %(gw)s udp dport %(data)d return
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, \
mld-listener-report, mld2-listener-report } return
    counter name leaked
  }
}
"""

# Answers every datagram on port 53 (IPv4 and IPv6): "the LAN's resolver".
RESOLVER = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 53))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

# Sends each probe once and says which were answered.
PROBE = """
import json, socket, sys
query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
answered = []
for host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        try:
            s.sendto(query, (host, port))
            s.recv(2048)
            answered.append(f"{host}:{port}")
        except OSError:
            pass
print(json.dumps(answered))
"""
TARGETS = [
    (GATEWAY, 53),
    (GATEWAY6, 53),
    (LAN_RESOLVER, 53),
    (GATEWAY, 9),
    (LAN_HOST, 9),
    (GATEWAY6, 9),
]

BAD_LOGINS = """
import sys, grpc
from pushgate_api import auth_pb2, auth_pb2_grpc
target, ca, count = sys.argv[1:]
with open(ca, "rb") as handle:
    credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
with grpc.secure_channel(target, credentials) as channel:
    stub = auth_pb2_grpc.AuthStub(channel)
    for _ in range(int(count)):
        try:
            stub.Login(auth_pb2.LoginRequest(username="alice", password="wrong"), timeout=10)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                sys.exit(1)  # not up yet
"""


class Client:
    def __init__(self, gw: GatewayLab) -> None:
        self.gw, self.lab, self.ns = gw, gw.lab, gw.clients[0]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.lab.exec(self.ns, list(argv), check=check)

    def probe(self) -> set[str]:
        result = self.run(sys.executable, "-c", PROBE, json.dumps(TARGETS))
        answered = set(json.loads(result.stdout))
        ping = self.run("ping", "-6", "-c", "1", "-W", "1", GATEWAY6, check=False)
        if ping.returncode == 0:
            answered.add("ping6")
        return answered

    def leaked(self) -> int:
        """Probe, then read (and zero) the leak counter."""
        self.probe()
        result = self.run("nft", "-j", "reset", "counter", "inet", "fclwatch", "leaked")
        items = json.loads(result.stdout)["nftables"]
        return next(i["counter"]["packets"] for i in items if "counter" in i)

    def zero(self) -> None:
        self.run("nft", "reset", "counter", "inet", "fclwatch", "leaked")

    def address(self) -> str | None:
        shown = self.run("ip", "-j", "-4", "address", "show", "dev", "pgc0", check=False)
        if shown.returncode != 0:
            return None
        for link in json.loads(shown.stdout):
            for info in link.get("addr_info", []):
                return f"{info['local']}/{info['prefixlen']}"
        return None


@pytest.fixture
def lab(tmp_path):
    workdir = str(tmp_path / "gw")
    Path(workdir).mkdir()
    with Lab("pgfcl") as lab:
        gw = GatewayLab(lab, workdir, clients=1, keepalive_seconds=2)
        text = Path(gw.config).read_text()
        text = text.replace(
            "failure_delay_seconds = 1.0", f"failure_delay_seconds = {THROTTLE_SECONDS}.0"
        )
        # No renewal tokens: the client keeps the password and logs in again with it,
        # the one kind of re-login a throttled account can keep failing (a renewal
        # token is not throttled: it cannot be guessed).
        text = text.replace("renewal_lifetime_seconds = 604800", "renewal_lifetime_seconds = 0")
        assert "renewal_lifetime_seconds = 0" in text
        # Also on LAN_RESOLVER: an auth service whose address is not the dataplane's.
        text = text.replace(f'listen = "{GATEWAY}:{AUTH_PORT}"', f'listen = "0.0.0.0:{AUTH_PORT}"')
        Path(gw.config).write_text(text)
        gw.add_user("alice")
        ns = gw.clients[0]
        # A dual-stack LAN with default routes of its own: where a leak would go.
        lab.exec(gw.gw, ["ip", "address", "add", f"{GATEWAY6}/64", "dev", "br0", "nodad"])
        lab.exec(gw.gw, ["ip", "address", "add", f"{LAN_RESOLVER}/32", "dev", "br0"])
        route = json.loads(lab.exec(ns, ["ip", "-j", "route", "get", GATEWAY]).stdout)
        dev = route[0]["dev"]
        lab.exec(ns, ["ip", "address", "add", f"{CLIENT6}/64", "dev", dev, "nodad"])
        lab.exec(ns, ["ip", "route", "add", "default", "via", GATEWAY])
        lab.exec(ns, ["ip", "-6", "route", "add", "default", "via", GATEWAY6])
        gw.start()
        lab.start(gw.gw, [sys.executable, "-c", RESOLVER])
        watch = WATCH % {"dev": dev, "gw": GATEWAY, "auth": AUTH_PORT, "data": 51820}
        lab.exec(ns, ["nft", "-f", "-"], input=watch)
        yield Client(gw)


def log_since(gw: GatewayLab, seen: int) -> str:
    return Path(gw.workdir, "client0.log").read_text()[seen:]


def test_nothing_leaves_outside_the_tunnel_until_disconnect(lab):
    client, gw = lab, lab.gw
    works = {f"{GATEWAY}:53", f"{GATEWAY6}:53", f"{LAN_RESOLVER}:53", "ping6"}
    wait_for(lambda: works <= client.probe(), 10, what="DNS and IPv6 before connecting")

    gw.connect(0, "alice", "--dead-after", "3")
    address = client.address()
    assert address is not None
    assert client.run("ping", "-c", "1", "-W", "2", LAN_HOST, check=False).returncode == 0
    client.zero()
    leaks = {}

    # 1. The dataplane is killed: the client reconnects, nothing leaves meanwhile.
    gw.kill(gw.dataplane)
    wait_for(lambda: gw.status(0).get("state") == "reconnecting", 20, what="reconnecting")
    leaks["dataplane killed"] = client.leaked()
    gw.start_dataplane()
    wait_for(lambda: gw.status(0).get("state") == "up", 30, what="up after the restart")

    # 2. A forced re-login while the account is throttled: the auth service forgets
    # the session (its row deleted while it was stopped, as an expiry after an outage)
    # and the client's own source has just failed too often for alice.
    seen = len(Path(gw.workdir, "client0.log").read_text())
    session_id = int(re.search(r"session (0x[0-9a-f]+)", gw.status(0)["tunnel"]).group(1), 16)
    gw.lab.stop(gw.auth)
    with contextlib.closing(sqlite3.connect(f"{gw.workdir}/pushgate.db")) as db, db:
        assert db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount
    gw.start_auth()
    wait_for(
        lambda: (
            client.run(
                sys.executable, "-c", BAD_LOGINS, f"{GATEWAY}:{AUTH_PORT}", gw.ca, "6", check=False
            ).returncode
            == 0
        ),
        20,
        what="the auth service back (six failed logins)",
    )
    gw.signal_client(0, signal.SIGUSR2)  # a rekey finds the session gone at once
    wait_for(lambda: "throttling" in log_since(gw, seen), 20, what="a throttled re-login")
    assert gw.status(0).get("state") in ("reconnecting", "logging_in")
    leaks["re-login throttled"] = client.leaked()
    held = client.address()  # make before break: the TUN and its address stay
    wait_for(lambda: gw.status(0).get("state") == "up", THROTTLE_SECONDS + 40, what="up again")
    said = log_since(gw, seen)
    kept = {
        "TUN and address held": held == address and "held while logging in again" in said,
        "TUN reused": "kept: same address" in said,
        "same address again": client.address() == address,  # the auth service's doing
    }
    assert client.run("ping", "-c", "1", "-W", "2", LAN_HOST, check=False).returncode == 0

    # 3. kill -9 of the client: its TUN and routes vanish, the kill switch does not.
    gw.kill(gw.client_processes.pop(0))
    assert client.address() is None
    leaks["client killed"] = client.leaked()
    # All at once, so that a failure shows every phase (each fails on main's code).
    assert (leaks, kept) == (
        {"dataplane killed": 0, "re-login throttled": 0, "client killed": 0},
        {"TUN and address held": True, "TUN reused": True, "same address again": True},
    )

    # A new client takes over the table the dead one left (and its stale route).
    gw.connect(0, "alice", "--dead-after", "3")  # (the dead one's session holds its address)
    assert client.address() is not None
    assert client.run("ping", "-c", "1", "-W", "2", LAN_HOST, check=False).returncode == 0
    gw.kill(gw.client_processes.pop(0))
    assert client.leaked() == 0

    # 4. `disconnect` cleans up after the crashed client: DNS and IPv6 work again.
    result = client.run(*gw.client_command(0), "disconnect")
    assert "cleaned up after a client that had exited" in result.stdout
    assert client.run("nft", "list", "tables").stdout.strip() == "table inet fclwatch"
    assert re.search(r"\S", client.run("ip", "route", "show", f"{GATEWAY}/32").stdout) is None
    assert works <= client.probe()


def test_without_the_kill_switch_a_full_tunnel_still_blocks_ipv6_and_dns(lab):
    """--no-lockdown: IPv4 is left to the routes, but IPv6 and DNS outside the tunnel
    are still dropped. The auth service is reached at an address that is not the
    dataplane's: it gets its own route around the tunnel."""
    client, gw = lab, lab.gw
    gw.client_processes[0] = gw.lab.start(
        gw.clients[0],
        [
            *gw.client_command(0),
            *("connect", "--server", f"{LAN_RESOLVER}:{AUTH_PORT}", "--server-name", GATEWAY),
            *("--ca", gw.ca, "--user", "alice", "--password-file", gw.password_file),
            "--no-lockdown",
        ],
        stdout=open(Path(gw.workdir, "client0.log"), "a"),  # noqa: SIM115 (the child keeps it)
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: gw.status(0).get("state") == "up", 30, what="up")
    around = client.run("ip", "route", "show", f"{LAN_RESOLVER}/32").stdout
    assert f"{LAN_RESOLVER} dev" in around  # the auth service, around the tunnel
    answered = client.probe()
    assert not answered & {f"{GATEWAY}:53", f"{GATEWAY6}:53", f"{LAN_RESOLVER}:53", "ping6"}
    tables = client.run("nft", "list", "table", "inet", "pushgate_pgc0").stdout
    assert "chain input" not in tables and "meta nfproto ipv6" in tables  # no kill switch
    gw.disconnect(0)
    assert client.run("ip", "route", "show", f"{LAN_RESOLVER}/32").stdout.strip() == ""
    works = {f"{GATEWAY}:53", f"{GATEWAY6}:53", f"{LAN_RESOLVER}:53", "ping6"}
    assert works <= client.probe()
