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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import gateway_config
from control_socket import ControlSocketError, PeerPolicy, PrivateServer, serve_private
from pushgate_api import control_pb2_grpc
from tundev import TUN_QUEUE_PACKETS
from tundev.linux import LinuxTun

from .device import Device
from .metrics import Counters, KernelDrops, loop_lag_histogram, register_collectors
from .registry import Registry
from .socket_filter import FilterUnavailable
from .socket_filter import attach as attach_filter
from .stats_api import DataplaneStatsServicer
from .sync import SessionSync

log = logging.getLogger("pushgate.dataplane")

SOCKET_BUFFER_BYTES = 4 << 20


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pushgate-dataplane: ip {' '.join(args)}: {result.stderr.strip()}")


def open_tun(cfg: gateway_config.GatewayConfig) -> LinuxTun:
    try:
        tun = LinuxTun(cfg.dataplane.tun_name, offload=True)  # TCP segments merged
    except OSError as error:
        raise SystemExit(
            f"pushgate-dataplane: cannot create TUN {cfg.dataplane.tun_name}: {error}"
        ) from None
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


async def serve_metrics(prometheus, host: str, port: int) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 /metrics endpoint on the event loop (consistent snapshots)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status, kind = generate_latest(prometheus), b"200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, kind = b"not found; try /metrics\n", b"404 Not Found", "text/plain"
            writer.write(
                b"HTTP/1.0 "
                + status
                + b"\r\nContent-Type: "
                + kind.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


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
    tun = open_tun(cfg)
    sock = open_udp(cfg.dataplane.listen)
    registry, counters = Registry(), Counters()
    prometheus = CollectorRegistry()
    device = Device(
        registry=registry,
        counters=counters,
        sock=sock,
        tun=tun,
        mtu=cfg.gateway.mtu,
        tunnel_network=cfg.gateway.tunnel_network,
        gateway_address=cfg.gateway.gateway_address,
        loop_lag_histogram=loop_lag_histogram(prometheus),
    )
    try:
        socket_filter = attach_filter(sock)
        log.info("malformed datagrams are dropped and counted in the kernel (eBPF filter)")
    except FilterUnavailable as why:
        socket_filter = None
        log.warning("no kernel socket filter (%s): all noise is counted in user space", why)
    filter_drops = socket_filter.drops if socket_filter else None
    register_collectors(
        prometheus,
        counters,
        registry,
        device.queues,
        KernelDrops(sock, tun.name, filter_drops=filter_drops),
        filter_drops,
    )
    device.start(loop)
    metrics_server = await serve_metrics(prometheus, *cfg.dataplane.metrics_listen)
    peers = PeerPolicy.for_service(cfg.gateway.control_peer_users)
    stats_server = await serve_stats(registry, counters, cfg.dataplane.stats_socket, peers)
    sync = SessionSync(registry, counters, cfg.gateway.control_socket, peers=peers)
    sync_task = asyncio.create_task(sync.run())
    log.info(
        "dataplane up: UDP %s:%d, TUN %s %s/%d mtu %d, metrics %s:%d, feed %s",
        *cfg.dataplane.listen,
        tun.name,
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
    device.stop()
    metrics_server.close()
    await stats_server.stop(1)
    sock.close()
    tun.close()


def nat(cfg: gateway_config.GatewayConfig, out_interface: str, remove: bool) -> int:
    """Masquerade the tunnel network out of `out_interface` (nftables) and forward."""
    table = "pushgate_nat"
    if remove:
        subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
        print(f"removed nftables table ip {table}")
        return 0
    forward = "/proc/sys/net/ipv4/ip_forward"
    with open(forward) as handle:
        enabled = handle.read().strip() == "1"
    if not enabled:  # (a container gets it from its runtime and may not write it)
        with open(forward, "w") as handle:
            handle.write("1\n")
    rules = (
        f"table ip {table} {{\n"
        f"  chain postrouting {{\n"
        f"    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {cfg.gateway.tunnel_network} oifname "{out_interface}" masquerade\n'
        f"  }}\n}}\n"
    )
    subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)
    result = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"pushgate-dataplane: nft failed: {result.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"forwarding on; {cfg.gateway.tunnel_network} masqueraded out of {out_interface}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-dataplane",
        description="the UDP push dataplane (one receive loop, server TUN, /metrics)",
    )
    parser.add_argument("--config", required=True, help="gateway config (TOML)")
    parser.add_argument("--listen", help="override [dataplane] listen, HOST:PORT")
    parser.add_argument("--tun-name", help="override [dataplane] tun_name")
    parser.add_argument("--metrics-listen", help="override [dataplane] metrics_listen")
    parser.add_argument(
        "--nat", metavar="OUT_IF", help="set up forwarding and NAT out of OUT_IF, then exit"
    )
    parser.add_argument("--remove-nat", action="store_true", help="remove the NAT table, exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    if args.nat or args.remove_nat:
        return nat(cfg, args.nat or "", args.remove_nat)
    try:
        asyncio.run(run(cfg))
    except ControlSocketError as error:
        print(f"pushgate-dataplane: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
