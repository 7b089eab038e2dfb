"""Two pushgate gateways on one PostgreSQL, in namespaces: a client fails over.

    client ns 198.18.1.2 --wan-- 198.18.1.1 gwa ns --lan-- 198.18.2.1
                                 198.18.1.3 gwb ns --lan-- 198.18.2.3
                                                    lan ns 198.18.2.2 (the lan host)

The wan and the lan are bridges in namespaces of their own. Each gateway runs its
pushgate-auth, pushgate-dataplane and pushgate-nat (masquerade out to the lan):
the lan host answers the gateway that forwarded a packet, so return traffic
follows the client's move (docs/scaling.md, "Failover"). Both auth services share
users and sessions in PostgreSQL (a database of the tests' server) and one TLS
certificate that names both addresses, as one organisation's CA would issue.
"""

import itertools
import os
import re
import shutil
import signal
import subprocess
import time

from client.core import FAILBACK_PROBE_SECONDS

from . import Lab, wait_for
from .auth import use_database
from .gateway import AUTH_PORT, DATAPLANE_PORT, PASSWORD, service_log_flags, tool

GATEWAYS = {"gw-a": ("198.18.1.1", "198.18.2.1", 10), "gw-b": ("198.18.1.3", "198.18.2.3", 20)}
CLIENT = "198.18.1.2"
LAN_HOST = "198.18.2.2"


def reply_times(output: str) -> list[float]:
    """The time of each echo reply `ping -D` printed."""
    return [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.M)]


def longest_silence(times: list[float], after: float, before: float) -> float:
    """The longest time without a reply between `after` and `before`."""
    marks = [after] + [t for t in times if after < t < before] + [before]
    return max(b - a for a, b in itertools.pairwise(marks))


def cluster_section(gateway_id: str) -> str:
    entries = ", ".join(
        f'{{ id = "{name}", auth = "{wan}:{AUTH_PORT}", dataplane = "{wan}:{DATAPLANE_PORT}",'
        f" preference = {preference} }}"
        for name, (wan, _, preference) in GATEWAYS.items()
    )
    return f'\n[cluster]\ngateway_id = "{gateway_id}"\ngateways = [{entries}]\n'


class ClusterLab:
    def __init__(self, lab: Lab, workdir: str, database_url: str, keepalive_seconds: int = 2):
        self.lab, self.workdir = lab, workdir
        wan, self.lan = lab.namespace("wan"), lab.namespace("lan")
        for ns in (wan, self.lan):
            lab.exec(ns, ["ip", "link", "add", "br0", "type", "bridge"])
            lab.exec(ns, ["ip", "link", "set", "br0", "up"])
        lab.exec(self.lan, ["ip", "address", "add", f"{LAN_HOST}/24", "dev", "br0"])
        self.client = lab.namespace("c0")
        self._bridge(self.client, CLIENT, wan)
        self.namespaces, self.lan_devices, self.configs = {}, {}, {}
        self.processes: dict[tuple[str, str], subprocess.Popen] = {}
        for name, (wan_address, lan_address, _) in GATEWAYS.items():
            ns = self.namespaces[name] = lab.namespace(name.replace("-", ""))
            self._bridge(ns, wan_address, wan)
            self.lan_devices[name] = self._bridge(ns, lan_address, self.lan)
            self.configs[name] = self._configure(name, wan_address, database_url, keepalive_seconds)
        self.ca = os.path.join(workdir, "gw-a", "tls", "ca.crt")
        self.password_file = os.path.join(workdir, "password")
        with open(self.password_file, "w") as handle:
            handle.write(PASSWORD + "\n")

    def _bridge(self, ns: str, address: str, bridge_ns: str) -> str:
        """A link from `ns` (with `address`/24) to the bridge of `bridge_ns`; its name in `ns`."""
        inside, port = self.lab.link(ns, f"{address}/24", bridge_ns, "198.18.0.254/32")
        self.lab.exec(bridge_ns, ["ip", "address", "flush", "dev", port])
        self.lab.exec(bridge_ns, ["ip", "link", "set", port, "master", "br0"])
        return inside

    def _configure(self, name: str, wan: str, database_url: str, keepalive: int) -> str:
        directory = os.path.join(self.workdir, name)
        os.makedirs(directory)
        init = [
            *(tool("pushgate-admin"), "init", "--dir", directory),
            *(arg for gateway in GATEWAYS.values() for arg in ("--server-name", gateway[0])),
            *("--auth-listen", f"{wan}:{AUTH_PORT}"),
            *("--dataplane-endpoint", f"{wan}:{DATAPLANE_PORT}"),
            *("--dataplane-listen", f"{wan}:{DATAPLANE_PORT}"),
            *("--route", "0.0.0.0/0"),
        ]
        subprocess.run(init, check=True, capture_output=True)
        if name != "gw-a":  # one certificate for both (it names both addresses)
            shutil.rmtree(os.path.join(directory, "tls"))
            shutil.copytree(
                os.path.join(self.workdir, "gw-a", "tls"), os.path.join(directory, "tls")
            )
        config = os.path.join(directory, "pushgate.toml")
        with open(config) as handle:
            text = handle.read().replace(
                "keepalive_seconds = 10", f"keepalive_seconds = {keepalive}"
            )
        with open(config, "w") as handle:
            handle.write(use_database(text, directory, database_url) + cluster_section(name))
        return config

    def _log(self, name: str):
        return open(os.path.join(self.workdir, f"{name}.log"), "a")

    def add_user(self, user: str) -> None:
        subprocess.run(
            [
                *(tool("pushgate-admin"), "user", "add", user),
                *("--config", self.configs["gw-a"], "--password-file", self.password_file),
            ],
            check=True,
            capture_output=True,
        )

    def start(self, name: str, service: str) -> None:
        """Start `service` ("auth" or "dataplane") of gateway `name`."""
        argv = [tool(f"pushgate-{service}"), "--config", self.configs[name], *service_log_flags()]
        self.processes[name, service] = self.lab.start(
            self.namespaces[name],
            argv,
            stdout=self._log(f"{name}-{service}"),
            stderr=subprocess.STDOUT,
        )

    def start_gateway(self, name: str) -> None:
        self.start(name, "auth")
        self.start(name, "dataplane")
        self.lab.exec(
            self.namespaces[name],
            [tool("pushgate-nat"), "--config", self.configs[name], self.lan_devices[name]],
        )

    def kill(self, name: str, service: str) -> None:
        self.lab.stop(self.processes.pop((name, service)), sig=9)

    def client_command(self) -> list[str]:
        status_dir = os.path.join(self.workdir, "client")
        return [tool("pushgate-client"), "--tun", "pgc0", "--status-dir", status_dir]

    def connect(self, user: str, gateway: str = "gw-a", *extra: str) -> subprocess.Popen:
        wan = GATEWAYS[gateway][0]
        process = self.lab.start(
            self.client,
            [
                *self.client_command(),
                *("connect", "--server", f"{wan}:{AUTH_PORT}", "--ca", self.ca),
                *("--user", user, "--password-file", self.password_file),
                *extra,
            ],
            stdout=self._log("client"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.status().get("state") == "up", 30, what="the client up")
        return process

    def status(self) -> dict[str, str]:
        result = self.lab.exec(self.client, [*self.client_command(), "status"], check=False)
        fields = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return fields

    def fail_over_and_back(self, interval: float, move_within: float) -> tuple[float, float]:
        """The client pings the lan host every `interval` s; gw-a's dataplane is
        killed (SIGKILL) and, once the client is on gw-b (within `move_within` s),
        started again; once the client is back on gw-a, the pings stop. The longest
        silence after the kill, and the longest around the move back (seconds)."""
        pinger = self.lab.start(
            self.client,
            ["ping", "-D", "-i", str(interval), "-W", "1", LAN_HOST],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        self.kill("gw-a", "dataplane")
        killed = time.time()
        wait_for(lambda: self.status().get("gateway") == "gw-b", move_within, what="on gw-b")
        time.sleep(2)
        self.start("gw-a", "dataplane")
        restarted = time.time()
        wait_for(
            lambda: self.status().get("gateway") == "gw-a",
            FAILBACK_PROBE_SECONDS + 10,
            what="back on gw-a",
        )
        back = time.time()
        time.sleep(2)
        self.lab.stop(pinger, sig=signal.SIGINT)
        replies = reply_times(pinger.stdout.read())
        return longest_silence(replies, killed, restarted), longest_silence(
            replies, restarted, back + 2
        )

    def logins(self) -> int:
        """Logins answered by either auth service (their logs)."""
        count = 0
        for name in GATEWAYS:
            path = os.path.join(self.workdir, f"{name}-auth.log")
            if os.path.exists(path):
                with open(path) as handle:
                    count += handle.read().count("login ok ")
        return count

    def log_tail(self, lines: int = 25) -> str:
        parts = []
        for name in sorted(os.listdir(self.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(self.workdir, name)) as handle:
                    parts.append(f"--- {name}\n" + "".join(handle.readlines()[-lines:]))
        return "\n".join(parts)
