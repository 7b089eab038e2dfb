"""A live change of the pushed network reaches the real client without tearing its
tunnel down (issue 18, item 5), in network namespaces.

Real parts: pushgate-auth, pushgate-dataplane and pushgate-client (netlab.gateway),
the client's TUN, routes and traffic. Played by the test: the auth service's
NetworkConfig after a change of the user's groups, by a real gRPC server over TLS in
front of the real auth service (tests/auth_network_double.py) that passes every call
through and replaces only the `network` of Rekey and SessionInfo answers. Also
played: `resolvectl`, a script on the client's PATH that records its arguments
(systemd-resolved cannot run here), so what is verified for DNS is the commands the
client gives it, on the same TUN, not resolution itself.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netlab import Lab, wait_for
from netlab.gateway import AUTH_PORT, GATEWAY, LAN_HOST, GatewayLab

pytestmark = [pytest.mark.netns, pytest.mark.processes]

DOUBLE_PORT = AUTH_PORT + 1
LAN2_GATEWAY, LAN2_HOST = "198.18.3.1", "198.18.3.2"
FIRST = ["198.18.2.0/24"]  # what the gateway's config pushes at login
WIDER = {
    "routes": ["198.18.2.0/24", "198.18.3.0/24"],
    "dns_servers": ["198.18.2.53"],
    "search_domains": ["eng.example"],
    "match_domains": ["eng.example", "corp.example"],
    "digest": "wider",
}
NARROWER = {"routes": ["198.18.3.0/24"], "digest": "narrower"}
FULL = {"routes": ["0.0.0.0/0"], "dns_servers": ["198.18.2.53"], "digest": "full"}
RESOLVECTL = """#!/bin/sh
echo "$*" >> {log}
"""


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


def test_routes_and_dns_change_on_the_live_tunnel(tmp_path):
    workdir = str(tmp_path)
    with Lab("pgpc") as lab:
        gw = GatewayLab(lab, workdir, clients=1, routes=tuple(FIRST), keepalive_seconds=2)
        # a second lan behind the gateway, routed back to the tunnel network
        lan2 = lab.namespace("lan2")
        lab.link(gw.gw, f"{LAN2_GATEWAY}/24", lan2, f"{LAN2_HOST}/24")
        lab.exec(lan2, ["ip", "route", "add", "198.19.0.0/16", "via", LAN2_GATEWAY])
        gw.add_user("alice")
        gw.start()

        network_file = tmp_path / "network.json"
        tls = Path(workdir) / "tls"
        double = lab.start(
            gw.gw,
            [
                sys.executable,
                str(Path(__file__).with_name("auth_network_double.py")),
                f"{GATEWAY}:{DOUBLE_PORT}",
                f"{GATEWAY}:{AUTH_PORT}",
                *(str(tls / name) for name in ("ca.crt", "server.crt", "server.key")),
                str(network_file),
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "double.log", "w"),  # noqa: SIM115 (closed with the lab)
            text=True,
        )
        assert double.stdout.readline().strip() == "listening"

        fakebin = tmp_path / "bin"
        fakebin.mkdir()
        resolvectl_log = tmp_path / "resolvectl.log"
        (fakebin / "resolvectl").write_text(RESOLVECTL.format(log=resolvectl_log))
        (fakebin / "resolvectl").chmod(0o755)
        client_log = tmp_path / "client.log"
        ns = gw.clients[0]
        client = lab.start(
            ns,
            [
                *gw.client_command(0),
                "connect",
                "--server",
                f"{GATEWAY}:{DOUBLE_PORT}",
                "--ca",
                gw.ca,
                "--user",
                "alice",
                "--password-file",
                gw.password_file,
            ],
            stdout=open(client_log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}"},
        )
        wait_for(lambda: gw.status(0).get("state") == "up", 30, what="the client to come up")
        session = gw.status(0)["tunnel"].split(" key epoch")[0]  # TUN, address, session
        index = ifindex(lab, ns)
        assert client_routes(lab, ns) >= set(FIRST)
        assert reaches(lab, ns, LAN_HOST)
        assert not reaches(lab, ns, LAN2_HOST)  # no route to it on the client yet
        assert not resolvectl_log.exists()  # no DNS pushed at login

        # Traffic flows all along: a ping to the lan host through every change.
        pings = lab.start(
            ns,
            ["ping", "-c", "400", "-i", "0.3", "-W", "2", LAN_HOST],
            stdout=subprocess.PIPE,
            text=True,
        )

        # 1. The user's groups now allow a second lan and push split DNS: the client
        # learns it from its periodic SessionInfo check, without a rekey or a login.
        network_file.write_text(json.dumps(WIDER))
        wait_for(
            lambda: "198.18.3.0/24" in client_routes(lab, ns),
            40,
            what="the new route from the periodic SessionInfo check",
        )
        assert reaches(lab, ns, LAN2_HOST) and reaches(lab, ns, LAN_HOST)
        wait_for(resolvectl_log.exists, 5, what="the split DNS")
        assert resolvectl_log.read_text().splitlines() == [
            "dns pgc0 198.18.2.53",
            "domain pgc0 eng.example ~eng.example ~corp.example",
            "default-route pgc0 no",
        ]

        # 2. The first lan is taken away and the DNS too: the client learns it from
        # the Rekey answer (SIGUSR2 rekeys now).
        network_file.write_text(json.dumps(NARROWER))
        os.kill(client.pid, signal.SIGUSR2)
        wait_for(
            lambda: "198.18.2.0/24" not in client_routes(lab, ns),
            10,
            what="the route withdrawn by the Rekey answer",
        )
        assert reaches(lab, ns, LAN2_HOST)
        assert not reaches(lab, ns, LAN_HOST)
        wait_for(
            lambda: resolvectl_log.read_text().splitlines()[-1:] == ["revert pgc0"],
            5,
            what="the DNS withdrawn",
        )

        # Nothing lost before the first lan was taken away.
        lab.stop(pings, signal.SIGINT)
        replies = [int(n) for n in re.findall(r"bytes from .* icmp_seq=(\d+)", pings.stdout.read())]
        assert replies and replies == list(range(1, len(replies) + 1)), replies

        # 3. Now a full tunnel: the gateway's /32 outside the tunnel, then the halves.
        network_file.write_text(json.dumps(FULL))
        os.kill(client.pid, signal.SIGUSR2)
        wait_for(
            lambda: {"0.0.0.0/1", "128.0.0.0/1"} <= client_routes(lab, ns),
            10,
            what="the full tunnel",
        )
        (outside,) = gateway_host_route(lab, ns)
        assert outside["dev"] != "pgc0"
        assert reaches(lab, ns, LAN_HOST) and reaches(lab, ns, LAN2_HOST)  # no loop
        wait_for(
            lambda: (
                resolvectl_log.read_text().splitlines()[-3:]
                == ["dns pgc0 198.18.2.53", "domain pgc0 ~.", "default-route pgc0 yes"]
            ),
            5,
            what="every name to the tunnel's DNS",
        )

        # 4. And back to split: the halves go, then the /32.
        network_file.write_text(json.dumps(NARROWER))
        os.kill(client.pid, signal.SIGUSR2)
        wait_for(lambda: not gateway_host_route(lab, ns), 10, what="the /32 removed")
        assert client_routes(lab, ns) & {"0.0.0.0/1", "128.0.0.0/1"} == set()
        assert reaches(lab, ns, LAN2_HOST) and not reaches(lab, ns, LAN_HOST)

        # The same session on the same TUN all along.
        status = gw.status(0)
        assert status["state"] == "up" and status["tunnel"].startswith(session)
        assert ifindex(lab, ns) == index
        log = client_log.read_text()
        assert log.count("network changed:") == 4
        assert "state up -> logging_in" not in log

        gw.lab.stop(client)
