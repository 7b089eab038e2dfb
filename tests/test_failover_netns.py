"""Two gateways on one PostgreSQL (netlab/cluster.py): a client whose gateway's
dataplane is killed mid-ping goes on through the other one within its dead-path
time, with no new login, and moves back once the preferred one is up again."""

import re

import pytest

from netlab import Lab
from netlab.cluster import ClusterLab

pytestmark = pytest.mark.netns

KEEPALIVE = 2
DEAD_AFTER = 2 * KEEPALIVE + 5  # the client's default: two keepalives and the handshake wait


def session_of(status: dict[str, str]) -> str:
    return re.search(r"session (0x[0-9a-f]+)", status["tunnel"]).group(1)


def test_a_killed_dataplane_fails_over_to_the_other_gateway_and_back(tmp_path, postgres):
    url = postgres.create_database("failover")
    with Lab("pgfo") as lab:
        cluster = ClusterLab(lab, str(tmp_path), url, keepalive_seconds=KEEPALIVE)
        cluster.add_user("alice")
        for name in ("gw-a", "gw-b"):
            cluster.start_gateway(name)
        cluster.connect("alice", "gw-a")
        status = cluster.status()
        assert status.get("gateway") == "gw-a", cluster.log_tail()
        session = session_of(status)
        # The kill switch (on for a full tunnel) lets every gateway's endpoints out.
        rules = lab.exec(cluster.client, ["nft", "list", "ruleset"]).stdout
        for wan in ("198.18.1.1", "198.18.1.3"):
            assert f"ip daddr {wan} tcp dport 7443 accept" in rules, rules
        assert "ip daddr 198.18.1.3 udp dport 51820 accept" in rules, rules
        outage, moving_back = cluster.fail_over_and_back(0.2, DEAD_AFTER + 10)
        status = cluster.status()
        assert session_of(status) == session and status.get("state") == "up"
        assert cluster.logins() == 1, cluster.log_tail()  # the one at the start: none since
        # Through gw-b within the dead-path time and 5 s (the bound) ...
        assert outage <= DEAD_AFTER + 5, (outage, cluster.log_tail())
        # ... and back to gw-a with nothing lost: it answered the probe first.
        assert moving_back <= 1.0, (moving_back, cluster.log_tail())
