"""`pushgate-auth`: builds and runs the auth service (servicers live in server.py)."""

import argparse
import asyncio
import logging
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

import gateway_config
from control_socket import ControlSocketError, PeerPolicy, serve_private
from push_protocol.aead import CipherSuite
from pushgate_api import auth_pb2, control_pb2_grpc

from .server import AuthMetrics, AuthServicer, SessionFeedServicer
from .sessions import AddressPool, SessionManager
from .store import Store
from .throttle import Limits, SprayWatch, Throttle

log = logging.getLogger("pushgate.auth")

MAX_REQUEST_BYTES = 64 * 1024
SWEEP_SECONDS = 1.0
SPRAY_WINDOW_SECONDS = 900.0  # pushgate_auth_accounts_targeted looks this far back
CIPHER_CODES = {
    CipherSuite.AES_256_GCM: auth_pb2.CIPHER_SUITE_AES_256_GCM,
    CipherSuite.CHACHA20_POLY1305: auth_pb2.CIPHER_SUITE_CHACHA20_POLY1305,
}


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


async def run(cfg: gateway_config.GatewayConfig) -> None:
    gw, auth = cfg.gateway, cfg.auth
    store = Store(auth.database)
    registry = CollectorRegistry()
    metrics = AuthMetrics(registry)
    sessions = SessionManager(
        store,
        AddressPool(gw.tunnel_network, gw.gateway_address, auth.address_quarantine_seconds),
        keepalive_seconds=gw.keepalive_seconds,
        session_lifetime_seconds=auth.session_lifetime_seconds,
        key_expiry_seconds=auth.key_expiry_seconds,
        allocated=lambda kind: metrics.allocations.labels(kind.value).inc(),
    )
    host, port = auth.dataplane_endpoint
    servicer = AuthServicer(
        sessions,
        metrics,
        throttle=Throttle(
            Limits(
                account_source=auth.max_failures_before_delay,
                source=auth.max_source_failures_before_delay,
                network=auth.max_network_failures_before_delay,
            ),
            auth.failure_delay_seconds,
            auth.max_failure_delay_seconds,
            auth.max_throttle_records,
        ),
        spray_watch=SprayWatch(auth.spray_alert_sources, SPRAY_WINDOW_SECONDS),
        hash_workers=auth.hash_workers,
        max_pending_hashes=auth.max_pending_hashes,
        default_cipher=CIPHER_CODES[gw.cipher],
        response_template={
            "prefix": gw.tunnel_network.prefixlen,
            "gateway": str(gw.gateway_address),
            "routes": list(auth.routes),
            "dns": list(auth.dns),
            "mtu": gw.mtu,
            "keepalive": int(gw.keepalive_seconds),
            "key_lifetime": int(auth.key_lifetime_seconds),
            "endpoint": auth_pb2.Endpoint(host=host, port=port),
        },
    )
    servicer.update_gauges()

    public = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    public.add_generic_rpc_handlers((servicer.generic_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, public)
    service_names = (
        auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, public)
    credentials = grpc.ssl_server_credentials([(_read(auth.tls_key), _read(auth.tls_cert))])
    public.add_secure_port(auth.listen, credentials)
    await public.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(service_names[0], health_pb2.HealthCheckResponse.SERVING)

    control = grpc.aio.server()
    control_pb2_grpc.add_SessionFeedServicer_to_server(
        SessionFeedServicer(sessions, servicer.update_gauges), control
    )
    control_socket = await serve_private(
        control,
        gw.control_socket,
        PeerPolicy.for_service(gw.control_group),
        on_refused=metrics.control_peers_refused.inc,
    )
    start_http_server(auth.metrics_listen[1], addr=auth.metrics_listen[0], registry=registry)
    log.info(
        "auth service up: clients %s (TLS), session feed unix:%s, metrics %s:%d, "
        "%d sessions, revision %d",
        auth.listen,
        gw.control_socket,
        *auth.metrics_listen,
        store.count_sessions(),
        store.revision,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)
        except TimeoutError:
            servicer.sweep(time.monotonic())
            expired = await sessions.expire(time.time())
            if expired:
                metrics.expired.inc(expired)
                servicer.update_gauges()
                log.info("expired %d sessions", expired)
            store.wipe_replaced_keys()  # ended and replaced keys leave the WAL
    log.info("stopping")
    await public.stop(2)
    await control_socket.stop(1)
    store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-auth",
        description="the gRPC auth service (client API over TLS, session feed on a Unix socket)",
    )
    parser.add_argument("--config", required=True, help="gateway config (TOML)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = gateway_config.load(args.config, auth=True)
        for path in (cfg.auth.tls_cert, cfg.auth.tls_key):
            _read(path)
    except gateway_config.ConfigError as error:
        print(f"pushgate-auth: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"pushgate-auth: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(cfg))
    except ControlSocketError as error:
        print(f"pushgate-auth: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
