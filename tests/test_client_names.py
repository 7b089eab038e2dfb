"""Host names for the gateway (issue 16, item 5), with real clients in namespaces.

The gateway is set up with `--dataplane-endpoint vpn.pushgate.test:51820`, as
README's example with a name; each client namespace resolves the name from its
own hosts file (netlab's Lab.hosts).
"""

import contextlib
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from netlab import Lab, wait_for
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, GatewayLab

pytestmark = pytest.mark.netns  # needs root: see the netns marker in pyproject.toml

NAME = "vpn.pushgate.test"
NOWHERE = "198.18.250.1"  # no route to it from the client namespaces


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("names"))
    with Lab("pgcn") as lab:
        gw = GatewayLab(lab, workdir, clients=2, keepalive_seconds=2, host_name=NAME)
        gw.add_user("alice")
        gw.add_user("bob")
        gw.start()
        yield gw


def sessions_of(gw: GatewayLab, user: str) -> int:
    with contextlib.closing(sqlite3.connect(f"{gw.workdir}/pushgate.db")) as db:
        return db.execute("SELECT COUNT(*) FROM sessions WHERE username = ?", (user,)).fetchone()[0]


def test_a_client_reaches_the_gateway_by_name(gateway):
    """Auth service and dataplane by name: the client resolves it once, routes the
    address around the full tunnel and sends to it; traffic flows."""
    gateway.lab.hosts(gateway.clients[0], {NAME: GATEWAY})
    gateway.connect(0, "alice")
    assert gateway.status(0)["server"].startswith(f"{NAME}:{AUTH_PORT}  (dataplane {GATEWAY}:")
    routes = gateway.lab.exec(gateway.clients[0], ["ip", "route"]).stdout
    assert f"{GATEWAY} " in routes  # the resolved address keeps its underlay route
    assert gateway.ping(0, LAN_HOST, count=2).returncode == 0


def test_a_login_whose_network_setup_fails_is_logged_out_at_once(gateway):
    """Bob's dataplane name points where he has no route: every login's setup fails
    (`ip route get` finds nothing) and the client tries again with backoff; each of
    those logins is logged out at once instead of holding a session and an address
    until it expires."""
    ns = gateway.clients[1]
    gateway.lab.hosts(ns, {NAME: NOWHERE})
    log = Path(gateway.workdir, "bob-failing.log")
    with open(log, "w") as output:
        client = gateway.lab.start(
            ns,
            [
                *gateway.client_command(1),
                "connect",
                *("--server", f"{GATEWAY}:{AUTH_PORT}", "--ca", gateway.ca, "--user", "bob"),
                *("--password-file", gateway.password_file),
            ],
            stdout=output,
            stderr=output,
        )
    failures = re.compile(rf"no route to the gateway {re.escape(NOWHERE)}")
    wait_for(
        lambda: len(failures.findall(log.read_text())) >= 3,
        60,
        what="three failed set-ups",
    )
    assert sessions_of(gateway, "bob") <= 1  # at most the attempt in flight
    gateway.lab.stop(client, sig=signal.SIGTERM)
    wait_for(lambda: sessions_of(gateway, "bob") == 0, 10, what="bob's sessions to go")
    text = log.read_text()
    assert "logging_in -> reconnecting (login_failed)" in text, text
    assert sessions_of(gateway, "alice") == 1  # alice is untouched
