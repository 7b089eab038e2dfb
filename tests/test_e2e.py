"""End to end: auth service, dataplane and real clients in network namespaces.

One gateway (netlab.gateway) serves the whole module; the tests run in order
and each leaves the gateway as it found it.
"""

import contextlib
import datetime
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auth_service.pki import make_ca
from netlab import Lab, metrics, wait_for
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, GatewayLab, tool

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

SEED = 7
BIG = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("e2e"))
    with Lab("pge2e") as lab:
        gw = GatewayLab(lab, workdir, clients=2, keepalive_seconds=2)
        gw.add_user("alice")
        gw.add_user("bob")
        gw.start()
        gw.connect(0, "alice")
        gw.connect(1, "bob")
        gw.serve_transfers(BIG, SEED)
        lab.start(
            gw.lan,
            [sys.executable, "-m", "netlab.transfer", "udp-echo", "5002"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        yield gw


def dataplane(gw: GatewayLab, name: str, **labels: str) -> float:
    return metrics.total(gw.scrape(), "pushgate_dataplane_" + name, **labels)


def connect_fails(gw: GatewayLab, *args: str, password_file: str | None = None):
    command = [
        tool("pushgate-client"),
        "--tun",
        "pgfail",
        "--status-dir",
        f"{gw.workdir}/failing",
        "connect",
        *args,
        "--password-file",
        password_file or gw.password_file,
    ]
    return gw.lab.exec(gw.clients[1], command, check=False, timeout=60)


def test_clear_messages_for_bad_credentials_and_a_wrong_ca(gateway, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    result = connect_fails(
        gateway,
        "--server",
        f"{GATEWAY}:{AUTH_PORT}",
        "--ca",
        gateway.ca,
        "--user",
        "bob",
        password_file=str(wrong),
    )
    assert result.returncode == 2
    assert "login refused: wrong user name or password" in result.stderr
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(
        make_ca("not the gateway", datetime.datetime.now(datetime.UTC), ["localhost"])[0]
    )
    result = connect_fails(
        gateway, "--server", f"{GATEWAY}:{AUTH_PORT}", "--ca", str(other_ca), "--user", "bob"
    )
    assert result.returncode == 2
    assert "certificate mismatch" in result.stderr


def test_ping_the_lan_host_through_nat(gateway):
    result = gateway.ping(0, LAN_HOST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0% packet loss" in result.stdout


def test_100mb_tcp_transfer_has_the_right_hash(gateway):
    ok, rate = gateway.fetched(gateway.fetch())
    print(f"100 MiB through the tunnel at {rate:.0f} Mbit/s")
    assert ok


def test_udp_through_the_tunnel(gateway):
    result = gateway.lab.exec(
        gateway.clients[0],
        [sys.executable, "-m", "netlab.transfer", "udp-probe", LAN_HOST, "5002", "50", "1200"],
    )
    assert int(result.stdout) >= 48  # one datagram at a time: nothing should be lost


def test_two_clients_do_not_reach_each_other_without_a_rule(gateway):
    """No [groups] in this config (the compatibility mode): client-to-client is off,
    each refused packet counted (tests/test_policy_e2e.py has it allowed by a rule)."""
    bob = gateway.status(1)["tunnel"].split()[1].split("/")[0]
    before = dataplane(gateway, "drops_total", direction="inbound", reason="policy_denied")
    result = gateway.ping(0, bob, count=3)
    assert result.returncode != 0, result.stdout
    after = dataplane(gateway, "drops_total", direction="inbound", reason="policy_denied")
    assert after == before + 3


def test_roaming_mid_transfer(gateway):
    port_before = gateway.status(0)["server"].split("local UDP port ")[1].rstrip(")")
    transfer = gateway.fetch()
    time.sleep(0.3)
    gateway.signal_client(0, signal.SIGUSR1)  # new UDP socket: a new source port
    ok, _ = gateway.fetched(transfer)
    assert ok
    wait_for(
        lambda: gateway.status(0)["server"].split("local UDP port ")[1].rstrip(")") != port_before,
        5,
        what="the status to show the new port",
    )


def test_rekey_during_a_transfer_loses_nothing(gateway):
    rekeys = dataplane(gateway, "session_rekeys_total")
    epoch = int(gateway.status(0)["tunnel"].split("key epoch ")[1])
    transfer = gateway.fetch()
    time.sleep(0.3)
    gateway.signal_client(0, signal.SIGUSR2)
    ok, _ = gateway.fetched(transfer)
    assert ok
    wait_for(
        lambda: int(gateway.status(0)["tunnel"].split("key epoch ")[1]) == epoch + 1,
        10,
        what="the client to use the new keys",
    )
    assert dataplane(gateway, "session_rekeys_total") == rekeys + 1


def test_a_rekey_that_finds_the_session_gone_logs_in_again_at_once(gateway):
    """The auth service forgets alice's session (its row deleted while it was
    stopped; on restart the dataplane drops the session too). Her next rekey is
    refused with UNAUTHENTICATED: the client says the session is gone (not "wrong
    password") and logs in again straight away, not after the dead-peer timeout."""
    old = re.search(r"session (0x[0-9a-f]+)", gateway.status(0)["tunnel"]).group(1)
    gateway.lab.stop(gateway.auth)
    with contextlib.closing(sqlite3.connect(f"{gateway.workdir}/pushgate.db")) as db, db:
        assert db.execute("DELETE FROM sessions WHERE session_id = ?", (int(old, 16),)).rowcount
    gateway.start_auth()
    wait_for(
        lambda: dataplane(gateway, "sessions", state="active") == 1,
        20,
        what="the dataplane to drop the forgotten session",
    )
    log = Path(gateway.workdir, "client0.log")
    seen = len(log.read_text())
    gateway.signal_client(0, signal.SIGUSR2)
    wait_for(
        lambda: gateway.status(0).get("state") == "up" and old not in gateway.status(0)["tunnel"],
        30,
        what="alice to log in again",
    )
    said = log.read_text()[seen:]
    assert "rekeying -> logging_in (relogin)" in said, said
    assert f"the gateway no longer knows session {old}" in said, said
    assert "reconnecting" not in said and "login refused" not in said, said
    assert dataplane(gateway, "sessions", state="active") == 2
    assert gateway.ping(0, LAN_HOST, count=2).returncode == 0


def test_dataplane_sigkill_and_restart_needs_no_new_login(gateway):
    session = gateway.status(0)["tunnel"]
    assert session.endswith("key epoch 0")
    gateway.kill(gateway.dataplane)
    gateway.start_dataplane()
    wait_for(
        lambda: gateway.ping(0, LAN_HOST, count=1).returncode == 0,
        20,
        what="traffic after the dataplane restart",
    )
    # The same session: re-learned keys are refused, so the client was asked to rekey.
    assert gateway.status(0)["tunnel"] == session.replace("key epoch 0", "key epoch 1")
    ok, _ = gateway.fetched(gateway.fetch())
    assert ok
    assert dataplane(gateway, "session_installs_total") == 2  # re-learned both, no login
    assert dataplane(gateway, "rekey_requests_sent_total") >= 1


def test_auth_service_down_leaves_traffic_alone(gateway):
    gateway.kill(gateway.auth)
    try:
        assert gateway.ping(0, LAN_HOST, count=3).returncode == 0
        ok, _ = gateway.fetched(gateway.fetch())
        assert ok
        assert gateway.status(0)["state"] == "up"
    finally:
        gateway.start_auth()


BLACKHOLE = """
table inet pushgate_test_outage {
  chain output { type filter hook output priority 0; udp dport 51820 drop; }
  chain input { type filter hook input priority 0; udp sport 51820 drop; }
}
"""


def test_client_notices_a_dead_path_and_recovers(gateway):
    ns = gateway.clients[1]
    gateway.lab.exec(ns, ["nft", "-f", "-"], input=BLACKHOLE)  # the client's network drops
    try:
        # Silence for two keepalives (2 s) + 5 s means the server is lost.
        wait_for(
            lambda: gateway.status(1)["state"] == "reconnecting",
            30,
            what="the client to notice the outage",
        )
        assert "no packet from the dataplane" in gateway.status(1)["last error"]
    finally:
        gateway.lab.exec(ns, ["nft", "delete", "table", "inet", "pushgate_test_outage"])
    wait_for(lambda: gateway.status(1)["state"] == "up", 60, what="the client to recover")
    assert gateway.ping(1, LAN_HOST, count=2).returncode == 0


def test_logout_removes_the_session_everywhere(gateway):
    wait_for(
        lambda: dataplane(gateway, "control_connected") == 1,
        20,
        what="the dataplane to watch the restarted auth service",
    )
    assert dataplane(gateway, "sessions", state="active") == 2
    gateway.disconnect(1)
    wait_for(
        lambda: dataplane(gateway, "sessions", state="active") == 1,
        10,
        what="the dataplane to forget the session",
    )
    links = gateway.lab.exec(gateway.clients[1], ["ip", "-o", "link"]).stdout
    assert "pgc1" not in links  # the client removed its TUN ...
    routes = gateway.lab.exec(gateway.clients[1], ["ip", "route"]).stdout
    assert "198.18.1.1 " not in routes  # ... and its route exception
    assert gateway.ping(0, LAN_HOST, count=1).returncode == 0  # the other client is fine
