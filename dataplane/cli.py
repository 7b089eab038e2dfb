"""`pushgate-dataplane`: the UDP push dataplane (bootstrap only; logic lives below)."""

import argparse
import asyncio
import dataclasses
import logging
import signal
import socket
import subprocess
import sys

import grpc
from prometheus_client import CollectorRegistry

from push_protocol.version import add_version_argument, register_build_info
from pushgate_api import control_pb2_grpc
from pushgate_io import gateway_config, logs
from pushgate_io.control_socket import ControlSocketError, PeerPolicy, PrivateServer, serve_private
from pushgate_io.event_loop import loop_factory
from pushgate_io.tun import TUN_QUEUE_PACKETS
from pushgate_io.tun_linux import LinuxTun

from . import tun_steering
from .conntrack import ConntrackCleaner
from .destinations import DestinationPolicy, parse_ip_addresses
from .device import Device
from .metrics import (
    Counters,
    KernelDrops,
    KernelSendErrors,
    loop_lag_histogram,
    register_collectors,
)
from .metrics_http import LOOP_ANSWER_SECONDS, MetricsServer, run_on_loop
from .privileges import drop_privileges, hand_capabilities_to_children
from .registry import Registry
from .socket_filter import FilterUnavailable
from .socket_filter import attach as attach_filter
from .stats_api import DataplaneStatsServicer
from .sync import SessionSync

log = logging.getLogger("pushgate.dataplane")

SOCKET_BUFFER_BYTES = 4 << 20
HOST_ADDRESS_REFRESH_SECONDS = 10  # an address added to the host is refused this soon


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pushgate-dataplane: ip {' '.join(args)}: {result.stderr.strip()}")


def open_tun(cfg: gateway_config.GatewayConfig) -> LinuxTun:
    """The server TUN: TCP segments merged on write and read as super-packets (TSO),
    a queue per group of client addresses (tun_steering.py), or one queue where
    the kernel will not steer them."""
    name = cfg.dataplane.tun_name
    try:
        tun = LinuxTun(name, offload=True, tso_reads=True, queues=tun_steering.QUEUES)
        try:
            tun_steering.attach(tun.fileno())
        except (FilterUnavailable, OSError) as why:
            tun.close()
            log.warning("one TUN queue for every client: cannot steer packets to queues: %s", why)
            tun = LinuxTun(name, offload=True, tso_reads=True)
    except OSError as error:
        raise SystemExit(f"pushgate-dataplane: cannot create TUN {name}: {error}") from None
    prefix = cfg.gateway.tunnel_network.prefixlen
    if cfg.gateway.tunnel_network.version == 4:
        _ip("link", "set", "dev", tun.name, "addrgenmode", "none")  # no IPv6 link-local chatter
    _ip("address", "replace", f"{cfg.gateway.gateway_address}/{prefix}", "dev", tun.name)
    mtu, queue = str(cfg.gateway.mtu), str(TUN_QUEUE_PACKETS)
    _ip("link", "set", "dev", tun.name, "mtu", mtu, "txqueuelen", queue, "up")
    return tun


def open_udp(listen: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setblocking(False)
    sock.bind(listen)
    return sock


def read_host_addresses() -> set:
    """Every address of this host (its network namespace), local and broadcast."""
    result = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip -j address show: {result.stderr.strip()}")
    return parse_ip_addresses(result.stdout)


async def refresh_host_addresses(destinations: DestinationPolicy) -> None:
    """Keep the host's addresses current (off the loop: a thread runs `ip`)."""
    while True:
        await asyncio.sleep(HOST_ADDRESS_REFRESH_SECONDS)
        try:
            destinations.set_host_addresses(await asyncio.to_thread(read_host_addresses))
        except (OSError, ValueError) as error:
            log.warning("cannot re-read the host's addresses, keeping the last: %s", error)


async def serve_stats(
    registry: Registry, counters: Counters, path: str, peers: PeerPolicy
) -> PrivateServer:
    server = grpc.aio.server()
    control_pb2_grpc.add_DataplaneStatsServicer_to_server(DataplaneStatsServicer(registry), server)

    def refused() -> None:
        counters.control_peers_refused["stats"] += 1

    return await serve_private(server, path, peers, on_refused=refused)


async def run(cfg: gateway_config.GatewayConfig) -> None:
    loop = asyncio.get_running_loop()
    hand_capabilities_to_children()  # the cleaner and `ip` below need CAP_NET_ADMIN
    # Ports first: one that is taken is the whole message, before anything else is done.
    with gateway_config.listening("[dataplane] listen", cfg.dataplane.listen, "push packets"):
        sock = open_udp(cfg.dataplane.listen)
    prometheus = CollectorRegistry()
    register_build_info(prometheus)
    metrics_listen = cfg.dataplane.metrics_listen
    with gateway_config.listening("[dataplane] metrics_listen", metrics_listen, "metrics"):
        metrics_server = MetricsServer(metrics_listen, prometheus)
    # Then the cleaner, while the process still has CAP_NET_ADMIN to hand on to it.
    cleaner = ConntrackCleaner.spawn(cfg.gateway.tunnel_network, cfg.gateway.gateway_address, loop)
    tun = open_tun(cfg)
    registry, counters = Registry(), Counters()
    registry.observe(cleaner)  # an ended session's NAT state goes with it
    prometheus.register(cleaner)
    destinations = DestinationPolicy(
        cfg.gateway.gateway_address,
        cfg.dataplane.deny_networks,
        cfg.dataplane.offered_services,
    )
    try:  # before the first packet: no moment when the host is open to clients
        destinations.set_host_addresses(read_host_addresses())
    except (OSError, ValueError) as error:
        raise SystemExit(f"pushgate-dataplane: cannot read the host's addresses: {error}") from None
    device = Device(
        registry=registry,
        counters=counters,
        sock=sock,
        tun=tun,
        mtu=cfg.gateway.mtu,
        tunnel_network=cfg.gateway.tunnel_network,
        gateway_address=cfg.gateway.gateway_address,
        loop_lag_histogram=loop_lag_histogram(prometheus),
        destinations=destinations,
    )
    try:
        socket_filter = attach_filter(sock)
        registry.observe(socket_filter)  # its set of live session ids follows the registry
        log.info(
            "malformed datagrams and unknown session ids are dropped and counted "
            "in the kernel (eBPF filter)"
        )
    except FilterUnavailable as why:
        socket_filter = None
        log.warning("no kernel socket filter (%s): all noise is counted in user space", why)
    # Set-up that needs privileges ends here; nothing below needs one (threads start below).
    drop_privileges(cfg.dataplane.user)
    filter_drops = socket_filter.drops if socket_filter else None
    register_collectors(
        prometheus,
        counters,
        registry,
        device.queues,
        KernelDrops(sock, tun.name, filter_drops=filter_drops),
        filter_drops,
        on_loop=lambda function: run_on_loop(loop, function, LOOP_ANSWER_SECONDS),
        kernel_send_errors=KernelSendErrors(),
        user_metrics=cfg.dataplane.user_metrics,
        tun_queues=len(tun.read_queues()),
    )
    device.start(loop)
    metrics_server.start()
    refresh_task = asyncio.create_task(refresh_host_addresses(destinations))
    peers = PeerPolicy.for_service(cfg.gateway.control_group)
    stats_server = await serve_stats(registry, counters, cfg.dataplane.stats_socket, peers)
    sync = SessionSync(registry, counters, cfg.gateway.control_socket, peers=peers)
    sync_task = asyncio.create_task(sync.run())
    log.info(
        "dataplane up: UDP %s:%d, TUN %s (%d queues) %s/%d mtu %d, metrics %s:%d, feed %s",
        *cfg.dataplane.listen,
        tun.name,
        len(tun.read_queues()),
        cfg.gateway.gateway_address,
        cfg.gateway.tunnel_network.prefixlen,
        cfg.gateway.mtu,
        *cfg.dataplane.metrics_listen,
        cfg.gateway.control_socket,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    sync_task.cancel()
    refresh_task.cancel()
    device.stop()
    metrics_server.stop()
    await stats_server.stop(1)
    sock.close()
    tun.close()
    cleaner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-dataplane",
        description="the UDP push dataplane (one receive loop, server TUN, /metrics)",
    )
    add_version_argument(parser)
    parser.add_argument("--config", required=True, help="gateway config (TOML)")
    parser.add_argument("--listen", help="override [dataplane] listen, HOST:PORT")
    parser.add_argument("--tun-name", help="override [dataplane] tun_name")
    parser.add_argument("--metrics-listen", help="override [dataplane] metrics_listen")
    logs.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure("pushgate-dataplane", args)
    try:
        cfg = gateway_config.load(args.config)
        overrides = {}
        if args.listen:
            overrides["listen"] = gateway_config.parse_host_port(args.listen, "--listen")
        if args.metrics_listen:
            overrides["metrics_listen"] = gateway_config.parse_host_port(
                args.metrics_listen, "--metrics-listen"
            )
        if args.tun_name:
            overrides["tun_name"] = args.tun_name
    except gateway_config.ConfigError as error:
        print(f"pushgate-dataplane: {error}", file=sys.stderr)
        return 2
    if overrides:
        cfg = dataclasses.replace(cfg, dataplane=dataclasses.replace(cfg.dataplane, **overrides))
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run(cfg))
    except (ControlSocketError, gateway_config.ListenError) as error:
        print(f"pushgate-dataplane: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
