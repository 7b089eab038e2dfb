"""The dataplane alone in namespaces, fed by netlab.feed instead of the auth service.

    client ns 198.18.10.2 --veth-- 198.18.10.1 gateway ns (pushgate-dataplane, TUN 198.19.10.1/24)
                                              198.18.11.1 --veth-- 198.18.11.2 lan ns (`lan()`)

The caller's process holds sockets inside both namespaces (netlab.socket_in): a
push client built on the shared TunnelSession in the client namespace, and an
"observer" UDP socket on the gateway's tunnel address that sees what the
dataplane writes to its TUN. Used by the dataplane tests and `make bench`.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

from push_protocol.aead import CipherSuite
from push_protocol.codec import parse_header
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession
from pushgate_api import control_pb2

from . import Lab, http_get, metrics, socket_in, wait_for
from .feed import FeedServer
from .packets import ipv4_udp

GW_UNDERLAY, CLIENT_UNDERLAY = "198.18.10.1", "198.18.10.2"
GW_TUNNEL = "198.19.10.1"
GW_LAN, LAN_HOST = "198.18.11.1", "198.18.11.2"
PORT = 51820
OBSERVER_PORT = 9999
METRICS_PORT = 9102

CONFIG = f"""
[gateway]
tunnel_network = "198.19.10.0/24"
gateway_address = "{GW_TUNNEL}"
mtu = 1420
keepalive_seconds = 2
control_socket = "control.sock"
[dataplane]
listen = "{GW_UNDERLAY}:{PORT}"
tun_name = "pgdp0"
stats_socket = "dataplane.sock"
metrics_listen = "127.0.0.1:{METRICS_PORT}"
# the observer, and the discard port bench/dataplane_bench.py sends to: on purpose
offered_services = ["udp {GW_TUNNEL}:{OBSERVER_PORT}", "udp {GW_TUNNEL}:9"]
"""


class PushClient:
    """A test client: the shared core plus a UDP socket in the client namespace."""

    def __init__(self, sock: socket.socket, sess: control_pb2.Session) -> None:
        keys = sess.current_keys
        self.address = sess.tunnel_addresses[0]
        self.session = TunnelSession(
            sess.session_id,
            CipherSuite.AES_256_GCM,
            Role.CLIENT,
            KeyMaterial(
                keys.key_epoch, keys.client_to_server_key, keys.server_to_client_key, time.time()
            ),
        )
        self.sock = sock
        sock.settimeout(5)

    def send_inner(self, packet: bytes) -> bytes:
        datagram = self.session.seal(packet, time.time())
        self.sock.sendto(datagram, (GW_UNDERLAY, PORT))
        return datagram

    def send_udp(
        self,
        payload: bytes,
        sport: int = 4000,
        src: str | None = None,
        dst: str = GW_TUNNEL,
        dport: int = OBSERVER_PORT,
    ) -> bytes:
        return self.send_inner(ipv4_udp(src or self.address, dst, sport, dport, payload))

    def receive_inner(self) -> bytes:
        while True:
            datagram = self.sock.recv(65536)
            payload = self.session.open(datagram, time.time(), parse_header(datagram, True))
            if payload:
                return payload


@contextlib.contextmanager
def dataplane_gateway(prefix: str, workdir: str):
    """A `Gateway` in a `Lab` of its own: everything it started is stopped and
    removed on the way out, even after a failure."""
    with Lab(prefix) as lab:
        gateway = Gateway(lab, workdir)
        try:
            yield gateway
        finally:
            gateway.feed.stop()
            if gateway.observer is not None:
                gateway.observer.close()
            lab.close()
            gateway.log.close()


class Gateway:
    def __init__(self, lab: Lab, workdir: str) -> None:
        self.lab = lab
        self.gw = lab.namespace("gw")
        self.cl = lab.namespace("cl")
        lab.link(self.cl, f"{CLIENT_UNDERLAY}/24", self.gw, f"{GW_UNDERLAY}/24")
        self.workdir = workdir
        self.config = os.path.join(workdir, "pushgate.toml")
        with open(self.config, "w") as handle:
            handle.write(CONFIG)
        self.feed = FeedServer(os.path.join(workdir, "control.sock")).start()
        self.log = open(os.path.join(workdir, "dataplane.log"), "w")  # noqa: SIM115 - fixture closes it
        self.process = None
        self.observer = None
        self.lan_ns: str | None = None

    def start_dataplane(self) -> None:
        self.process = self.lab.start(
            self.gw,
            [sys.executable, "-m", "dataplane.cli", "--config", self.config],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=os.getcwd(),
        )
        wait_for(lambda: self._scrape_or_none(), 20, what="dataplane /metrics")
        if self.observer is not None:
            self.observer.close()
        self.observer = socket_in(self.gw)
        self.observer.bind((GW_TUNNEL, OBSERVER_PORT))
        self.observer.settimeout(5)

    def start_with(self, *sessions: control_pb2.Session) -> None:
        """Start the dataplane, then log `sessions` in (feed events, so their keys
        are fresh: a listed key would be a re-learned one, docs/protocol.md)."""
        self.start_dataplane()
        for sess in sessions:
            self.feed.install(sess)
        self.wait_sessions(len(sessions))

    def lan(self, port: int = OBSERVER_PORT) -> socket.socket:
        """A host behind the gateway (LAN_HOST, routed, no NAT): a UDP socket bound
        there on `port`. What reaches it went through the dataplane's TUN and the
        gateway's forwarding, not to a service the gateway offers."""
        if self.lan_ns is None:
            self.lan_ns = self.lab.namespace("lan")
            self.lab.link(self.gw, f"{GW_LAN}/24", self.lan_ns, f"{LAN_HOST}/24")
            self.lab.exec(self.gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            self.lab.exec(self.lan_ns, ["ip", "route", "add", "198.19.10.0/24", "via", GW_LAN])
        sock = socket_in(self.lan_ns)
        sock.bind((LAN_HOST, port))
        sock.settimeout(5)
        return sock

    def _scrape_or_none(self):
        try:
            return self.scrape()
        except OSError:
            return None

    def scrape(self):
        return metrics.parse(http_get(self.gw, METRICS_PORT, "/metrics").decode())

    def client(self, sess: control_pb2.Session) -> PushClient:
        return PushClient(socket_in(self.cl), sess)

    def wait_sessions(self, count: int) -> None:
        wait_for(
            lambda: (
                metrics.total(self.scrape(), "pushgate_dataplane_sessions", state="active") == count
            ),
            20,
            what=f"{count} active sessions",
        )

    def observe(self) -> tuple[str, int, bytes]:
        data, (host, port) = self.observer.recvfrom(65536)
        return host, port, data
