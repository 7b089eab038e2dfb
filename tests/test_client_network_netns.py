"""A live change of a user's access reaches the real client's routes and DNS without
tearing its tunnel down (issue 18, item 5), in network namespaces.

Real parts: pushgate-auth with [groups.*] rules, group membership changed with
pushgate-admin and the rules reloaded with SIGHUP, pushgate-dataplane and
pushgate-client (netlab.gateway), the client's TUN, routes and traffic. Played by
the test: `resolvectl`, a script on the client's PATH that records its arguments
(systemd-resolved cannot run here), so what is verified for DNS is the commands
the client gives it, on the same TUN, not resolution itself.
"""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from netlab import Lab, wait_for
from netlab.gateway import GATEWAY, LAN_HOST, GatewayLab, tool

pytestmark = [pytest.mark.netns, pytest.mark.processes]

LAN2_GATEWAY, LAN2_HOST = "198.18.5.1", "198.18.5.2"
GROUPS = """
[groups.eng]
allow = ["198.18.2.0/24"]
{eng_routes}
[groups.ops]
allow = ["198.18.5.0/24"]
dns_servers = ["198.18.2.53"]
search_domains = ["ops.example"]
match_domains = ["ops.example", "corp.example"]
"""
RESOLVECTL = """#!/bin/sh
echo "$*" >> {log}
"""
HALVES = {"0.0.0.0/1", "128.0.0.0/1"}


def client_routes(lab: Lab, ns: str) -> set[str]:
    out = lab.exec(ns, ["ip", "-j", "route", "show", "dev", "pgc0"]).stdout
    return {entry["dst"] for entry in json.loads(out)}


def gateway_host_route(lab: Lab, ns: str) -> list[dict]:
    """The route that keeps the tunnel's own packets to the gateway outside it."""
    return json.loads(lab.exec(ns, ["ip", "-j", "route", "show", f"{GATEWAY}/32"]).stdout)


def ifindex(lab: Lab, ns: str) -> int:
    return json.loads(lab.exec(ns, ["ip", "-j", "link", "show", "pgc0"]).stdout)[0]["ifindex"]


def reaches(lab: Lab, ns: str, address: str) -> bool:
    ping = ["ping", "-c", "2", "-i", "0.2", "-W", "2", address]
    return lab.exec(ns, ping, check=False).returncode == 0


def test_group_changes_reach_the_live_tunnel(tmp_path):
    workdir = str(tmp_path)
    with Lab("pgpc") as lab:
        gw = GatewayLab(lab, workdir, clients=1, routes=("198.18.2.0/24",), keepalive_seconds=2)
        config = Path(gw.config)
        base = config.read_text()

        def write_groups(eng_routes: str = "") -> None:
            config.write_text(base + GROUPS.format(eng_routes=eng_routes))

        def admin(*args: str) -> None:
            subprocess.run(
                [tool("pushgate-admin"), *args, "--config", gw.config],
                check=True,
                capture_output=True,
            )

        # a second lan behind the gateway, routed back to the tunnel network
        lan2 = lab.namespace("lan2")
        lab.link(gw.gw, f"{LAN2_GATEWAY}/24", lan2, f"{LAN2_HOST}/24")
        lab.exec(lan2, ["ip", "route", "add", "198.19.0.0/16", "via", LAN2_GATEWAY])
        write_groups()
        gw.add_user("alice")
        admin("group", "add", "eng", "alice")
        gw.start()

        fakebin = tmp_path / "bin"
        fakebin.mkdir()
        resolvectl_log = tmp_path / "resolvectl.log"
        (fakebin / "resolvectl").write_text(RESOLVECTL.format(log=resolvectl_log))
        (fakebin / "resolvectl").chmod(0o755)
        os.environ["PATH"], path = f"{fakebin}:{os.environ['PATH']}", os.environ["PATH"]
        try:  # the client (started through `ip netns exec`) inherits it
            gw.connect(0, "alice")
        finally:
            os.environ["PATH"] = path
        client = gw.client_processes[0]
        ns = gw.clients[0]

        def resolvectl_calls() -> list[str]:
            return resolvectl_log.read_text().splitlines() if resolvectl_log.exists() else []

        auth_log = tmp_path / "auth.log"

        def reload_rules() -> None:
            """SIGHUP, and wait until the auth service says it reloaded."""
            done = auth_log.read_text().count("reloaded ")
            os.kill(gw.auth.pid, signal.SIGHUP)
            wait_for(lambda: auth_log.read_text().count("reloaded ") > done, 10, what="reload")

        def rekey_now() -> None:
            os.kill(client.pid, signal.SIGUSR2)

        session = gw.status(0)["tunnel"].split(" key epoch")[0]  # TUN, address, session
        index = ifindex(lab, ns)
        assert "198.18.2.0/24" in client_routes(lab, ns)
        assert "198.18.5.0/24" not in client_routes(lab, ns)
        assert reaches(lab, ns, LAN_HOST)
        assert not reaches(lab, ns, LAN2_HOST)  # no route to it on the client
        assert resolvectl_calls() == []  # eng pushes no DNS

        # Traffic to the lan host flows through every change below.
        pings = lab.start(
            ns,
            ["ping", "-c", "1000", "-i", "0.3", "-W", "2", LAN_HOST],
            stdout=subprocess.PIPE,
            text=True,
        )

        # 1. alice joins ops: a second lan and split DNS, learned from the client's
        # periodic SessionInfo check (no rekey, no login).
        admin("group", "add", "ops", "alice")
        wait_for(
            lambda: "198.18.5.0/24" in client_routes(lab, ns),
            40,
            what="the new route from the periodic SessionInfo check",
        )
        assert reaches(lab, ns, LAN2_HOST)
        wait_for(lambda: len(resolvectl_calls()) == 3, 5, what="the split DNS")
        assert resolvectl_calls() == [
            "dns pgc0 198.18.2.53",
            "domain pgc0 ops.example ~ops.example ~corp.example",
            "default-route pgc0 no",
        ]

        # 2. eng's rules now route everything (a reload): a full tunnel, the gateway's
        # /32 outside it, every name to the tunnel's DNS.
        write_groups('routes = ["0.0.0.0/0"]')
        reload_rules()
        rekey_now()  # the Rekey answer brings it at once
        wait_for(lambda: client_routes(lab, ns) >= HALVES, 10, what="the full tunnel")
        (outside,) = gateway_host_route(lab, ns)
        assert outside["dev"] != "pgc0"
        assert reaches(lab, ns, LAN2_HOST)  # the tunnel's own packets do not loop
        wait_for(
            lambda: (
                resolvectl_calls()[-2:]
                == [
                    "domain pgc0 ops.example ~ops.example ~corp.example ~.",
                    "default-route pgc0 yes",
                ]
            ),
            5,
            what="every name to the tunnel's DNS",
        )

        # 3. alice leaves ops: no DNS any more; 4. eng back to its derived route.
        admin("group", "remove", "ops", "alice")
        rekey_now()
        wait_for(lambda: resolvectl_calls()[-1:] == ["revert pgc0"], 10, what="no DNS")
        write_groups()
        reload_rules()
        rekey_now()
        wait_for(lambda: not gateway_host_route(lab, ns), 10, what="back to a split tunnel")
        routes = client_routes(lab, ns)
        assert "198.18.2.0/24" in routes and not routes & HALVES
        assert "198.18.5.0/24" not in routes
        assert not reaches(lab, ns, LAN2_HOST)

        # The same session on the same TUN all along, and not one ping lost.
        status = gw.status(0)
        assert status["state"] == "up" and status["tunnel"].startswith(session)
        assert ifindex(lab, ns) == index
        lab.stop(pings, signal.SIGINT)
        out = pings.stdout.read()
        replies = [int(n) for n in re.findall(r"bytes from .* icmp_seq=(\d+)", out)]
        sent = int(re.search(r"(\d+) packets transmitted", out).group(1))
        assert replies == list(range(1, len(replies) + 1)) and len(replies) >= sent - 1, out
        log = (tmp_path / "client0.log").read_text()
        assert log.count("network changed:") == 4
        assert "state up -> logging_in" not in log
