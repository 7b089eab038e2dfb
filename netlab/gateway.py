"""A whole pushgate gateway in namespaces, for `make demo` and the end-to-end tests.

    client-N ns 198.18.1.N+1 --bridge-- 198.18.1.1  gw ns  198.18.2.1 --lan-- 198.18.2.2  lan ns
                pgcN 198.19.0.x  (tunnel)          pg0 198.19.0.1, NAT out to the lan
                                                          198.18.3.1 --lan2-- 198.18.3.2  lan2 ns
                                                          (`lan_hosts=2`: routed, no NAT)

The gateway namespace runs pushgate-auth and pushgate-dataplane; each client
namespace runs pushgate-client (full tunnel by default); the lan host has no
route to the tunnel network, so reaching it proves the gateway's NAT.
"""

import os
import signal
import subprocess
import sys

from . import Lab, http_get, metrics, wait_for
from .auth import use_database
from .transfer import expected_sha256

GATEWAY = "198.18.1.1"
LAN_GATEWAY = "198.18.2.1"
LAN_HOST = "198.18.2.2"
LAN2_GATEWAY = "198.18.3.1"
LAN2_HOST = "198.18.3.2"
AUTH_PORT = 7443
DATAPLANE_PORT = 51820
METRICS_PORT = 9102
PASSWORD = "correct horse battery staple"
TRANSFER_PORT = 5001  # the lan host's TCP transfer server (netlab.transfer)


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def service_log_flags() -> list[str]:
    """Extra logging flags for the services, from PUSHGATE_SERVICE_LOG_FLAGS (`make
    log-audit` runs the end-to-end suite at debug level in JSON this way)."""
    return os.environ.get("PUSHGATE_SERVICE_LOG_FLAGS", "").split()


class GatewayLab:
    def __init__(
        self,
        lab: Lab,
        workdir: str,
        clients: int = 1,
        routes: tuple[str, ...] = ("0.0.0.0/0",),
        keepalive_seconds: int = 10,
        offered_services: tuple[str, ...] = (),
        metrics_host: str = "127.0.0.1",
        host_name: str | None = None,
        lan_hosts: int = 1,
        database_url: str | None = None,
    ) -> None:
        self.lab = lab
        # Clients reach auth service and dataplane by this name (each client namespace
        # needs it in its hosts file: Lab.hosts), else by the address.
        self.server_host = host_name or GATEWAY
        self.metrics_host = metrics_host
        self.workdir = workdir
        self.gw = lab.namespace("gw")
        self.lan = lab.namespace("lan")
        lab.exec(self.gw, ["ip", "link", "add", "br0", "type", "bridge"])
        lab.exec(self.gw, ["ip", "address", "add", f"{GATEWAY}/24", "dev", "br0"])
        lab.exec(self.gw, ["ip", "link", "set", "br0", "up"])
        self.clients = []
        for index in range(clients):
            ns = lab.namespace(f"c{index}")
            _, port = lab.link(ns, f"198.18.1.{index + 2}/24", self.gw, "198.18.1.254/32")
            lab.exec(self.gw, ["ip", "address", "flush", "dev", port])
            lab.exec(self.gw, ["ip", "link", "set", port, "master", "br0"])
            self.clients.append(ns)
        self.lan_dev, _ = lab.link(self.gw, f"{LAN_GATEWAY}/24", self.lan, f"{LAN_HOST}/24")
        self.lan2 = None
        if lan_hosts > 1:  # a second host behind the gateway, which routes to it (no NAT)
            self.lan2 = lab.namespace("lan2")
            lab.link(self.gw, f"{LAN2_GATEWAY}/24", self.lan2, f"{LAN2_HOST}/24")
            lab.exec(self.lan2, ["ip", "route", "add", "198.19.0.0/16", "via", LAN2_GATEWAY])
        self.config = os.path.join(workdir, "pushgate.toml")
        self.ca = os.path.join(workdir, "tls", "ca.crt")
        self.password_file = os.path.join(workdir, "password")
        with open(self.password_file, "w") as handle:
            handle.write(PASSWORD + "\n")
        init = [
            tool("pushgate-admin"),
            "init",
            "--dir",
            workdir,
            *(("--server-name", host_name) if host_name else ()),
            "--server-name",
            GATEWAY,
            "--auth-listen",
            f"{GATEWAY}:{AUTH_PORT}",
            "--dataplane-endpoint",
            f"{self.server_host}:{DATAPLANE_PORT}",
            "--dataplane-listen",
            f"{GATEWAY}:{DATAPLANE_PORT}",
        ]
        for route in routes:
            init += ["--route", route]
        subprocess.run(init, check=True, capture_output=True)
        with open(self.config) as handle:
            text = handle.read()
        text = text.replace("keepalive_seconds = 10", f"keepalive_seconds = {keepalive_seconds}")
        if offered_services:  # besides ping to the gateway's tunnel address, as init writes
            offered = ", ".join(f'"{service}"' for service in offered_services)
            text = text.replace("offered_services = [", f"offered_services = [{offered}, ")
        if database_url is not None:  # users and sessions in PostgreSQL
            text = use_database(text, workdir, database_url)
        with open(self.config, "w") as handle:
            handle.write(text)
        self.auth = self.dataplane = None
        self.client_processes: dict[int, subprocess.Popen] = {}
        self._transfer: tuple[int, int] | None = None  # (size, seed) the lan host serves

    def _log(self, name: str):
        return open(os.path.join(self.workdir, f"{name}.log"), "a")

    def log_tail(self, *names: str, lines: int = 30) -> str:
        """The last lines of each process's log, for an assertion's message."""
        parts = []
        for name in names:
            try:
                with open(os.path.join(self.workdir, f"{name}.log")) as handle:
                    tail = handle.readlines()[-lines:]
            except OSError as error:
                tail = [f"({error})\n"]
            parts.append(f"--- {name}.log\n" + "".join(tail))
        return "\n".join(parts)

    def add_user(self, name: str) -> None:
        subprocess.run(
            [
                tool("pushgate-admin"),
                "user",
                "add",
                name,
                "--config",
                self.config,
                "--password-file",
                self.password_file,
            ],
            check=True,
            capture_output=True,
        )

    def start_auth(self) -> None:
        self.auth = self.lab.start(
            self.gw,
            [tool("pushgate-auth"), "--config", self.config, *service_log_flags()],
            stdout=self._log("auth"),
            stderr=subprocess.STDOUT,
        )

    def start_dataplane(self) -> None:
        self.dataplane = self.lab.start(
            self.gw,
            [
                tool("pushgate-dataplane"),
                "--config",
                self.config,
                "--metrics-listen",
                f"{self.metrics_host}:{METRICS_PORT}",
                *service_log_flags(),
            ],
            stdout=self._log("dataplane"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._scrape_or_none, 20, what="the dataplane's /metrics")

    def start(self) -> None:
        self.start_auth()
        self.start_dataplane()
        self.lab.exec(self.gw, [tool("pushgate-nat"), "--config", self.config, self.lan_dev])

    def kill(self, process: subprocess.Popen) -> None:
        self.lab.stop(process, sig=signal.SIGKILL)

    # -- clients ------------------------------------------------------------------

    def client_command(self, index: int) -> list[str]:
        return [
            tool("pushgate-client"),
            "--tun",
            f"pgc{index}",
            "--status-dir",
            os.path.join(self.workdir, f"client{index}"),
        ]

    def connect(self, index: int, user: str, *extra: str) -> None:
        self.client_processes[index] = self.lab.start(
            self.clients[index],
            [
                *self.client_command(index),
                "connect",
                "--server",
                f"{self.server_host}:{AUTH_PORT}",
                "--ca",
                self.ca,
                "--user",
                user,
                "--password-file",
                self.password_file,
                *extra,
            ],
            stdout=self._log(f"client{index}"),
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.status(index).get("state") == "up", 30, what=f"client {index} to come up"
        )

    # -- TCP transfers from the lan host -------------------------------------------

    def serve_transfers(self, size: int, seed: int) -> None:
        """The lan host sends `size` bytes of `seed`'s stream to every TCP client."""
        self._transfer = (size, seed)
        self.lab.start(
            self.lan,
            [
                *(sys.executable, "-m", "netlab.transfer", "serve-tcp"),
                *(str(TRANSFER_PORT), str(size), str(seed)),
            ],
            stdout=subprocess.DEVNULL,
        )

    def fetch(self, index: int = 0) -> subprocess.Popen:
        """Client `index` fetches one transfer through its tunnel; see `fetched`."""
        return self.lab.start(
            self.clients[index],
            [sys.executable, "-m", "netlab.transfer", "fetch-tcp", LAN_HOST, str(TRANSFER_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def fetched(self, process: subprocess.Popen) -> tuple[bool, float]:
        """(size and SHA-256 as served, Mbit/s) of a finished `fetch`."""
        out, _ = process.communicate(timeout=300)
        got, digest, seconds = out.split()
        size, seed = self._transfer
        ok = int(got) == size and digest == expected_sha256(size, seed)
        return ok, int(got) * 8 / float(seconds) / 1e6

    def status(self, index: int) -> dict[str, str]:
        result = self.lab.exec(
            self.clients[index], [*self.client_command(index), "status"], check=False
        )
        fields = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return fields

    def disconnect(self, index: int) -> None:
        self.lab.exec(self.clients[index], [*self.client_command(index), "disconnect"])
        self.client_processes.pop(index).wait(10)

    def signal_client(self, index: int, signum: int) -> None:
        os.kill(self.client_processes[index].pid, signum)

    # -- observing ------------------------------------------------------------------

    def _scrape_or_none(self):
        try:
            return self.scrape()
        except OSError:
            return None

    def scrape(self) -> dict:
        return metrics.parse(self.metrics_text())

    def metrics_text(self) -> str:
        return http_get(self.gw, METRICS_PORT, "/metrics").decode()

    def ping(self, index: int, address: str, count: int = 5) -> subprocess.CompletedProcess:
        return self.lab.exec(
            self.clients[index],
            ["ping", "-c", str(count), "-i", "0.2", "-W", "2", address],
            check=False,
        )
