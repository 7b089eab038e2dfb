"""`pushgate-auth`: builds and runs the auth service (servicers live in server.py)."""

import argparse
import asyncio
import logging
import resource
import signal
import socket
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.process_collector import ProcessCollector

from push_protocol.version import add_version_argument, register_build_info
from pushgate_api import admin_pb2_grpc, auth_pb2, control_pb2_grpc
from pushgate_io import gateway_config, logs
from pushgate_io.control_socket import ControlSocketError, PeerPolicy, serve_private

from . import health, limits, oidc
from .access import AccessModel
from .admin_api import AdminServicer
from .audit import REMOVAL_NAMES, REVOCATION_NAMES, AuditLog
from .database import DatabaseUnavailable
from .server import AuthMetrics, AuthServicer, DatabaseGuard, SessionFeedServicer
from .sessions import AddressPool, SessionManager
from .store import Store
from .throttle import Limits, SprayWatch, Throttle

log = logging.getLogger("pushgate.auth")

MAX_REQUEST_BYTES = 64 * 1024
SWEEP_SECONDS = 1.0  # expiry sweep and self-check
SPRAY_WINDOW_SECONDS = 900.0  # pushgate_auth_accounts_targeted looks this far back


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def raise_fd_limit(max_connections: int) -> limits.Limits:
    """Soft RLIMIT_NOFILE up to the hard one (each client connection is a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = limits.plan(soft, hard, max_connections)
    if plan.fd_limit != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.fd_limit, hard))
    log.info(
        "file descriptors: limit %d (was %d); client connections: at most %d, %d calls at "
        "once, %d per connection",
        plan.fd_limit,
        soft,
        plan.connections,
        limits.MAX_CONCURRENT_RPCS,
        limits.MAX_STREAMS_PER_CONNECTION,
    )
    return plan


def gateway_list(cluster, endpoint) -> list:
    """The gateways a login answer names: the cluster's, by preference, or this lone
    gateway (no id: its keys are used as minted; no auth endpoint: the client's
    server is it)."""
    if cluster is None:
        return [auth_pb2.Gateway(dataplane_endpoint=endpoint)]
    return [
        auth_pb2.Gateway(
            id=g.id,
            auth_endpoint=auth_pb2.Endpoint(host=g.auth[0], port=g.auth[1]),
            dataplane_endpoint=auth_pb2.Endpoint(host=g.dataplane[0], port=g.dataplane[1]),
            preference=g.preference,
        )
        for g in cluster.gateways
    ]


async def housekeeping(sessions, servicer, metrics, self_check, probe) -> None:
    """Expiry, revocation of what users changed outside the admin API, the
    throttle's pruning, ended keys out of the WAL, and the self-check, on the event
    loop: if this stops running, so do logins."""
    try:
        servicer.sweep(time.monotonic())
        # what other auth services on a shared database changed (also told by NOTIFY)
        if await sessions.catch_up():
            servicer.update_gauges()
        expired = await sessions.expire(time.time())
        if await sessions.revoke_stale():
            servicer.update_gauges()
        sessions.forget_old_revocations(time.time())
        sessions.forget_old_changes()
        sessions.store.wipe_replaced_keys()  # ended and replaced keys leave the WAL
    except DatabaseUnavailable as error:
        log.error("housekeeping: %s", error)
        expired, ok = 0, False
    else:
        ok = await probe.writable()
    if expired:
        metrics.expired.inc(expired)
        servicer.update_gauges()
        log.info("expired %d sessions", expired)
    metrics.healthy.set(int(ok))
    if await self_check.record(ok):
        if ok:
            log.info("self-check passes: health SERVING")
        else:
            log.error(
                "self-check fails (database write lock not had within %g s): health NOT_SERVING",
                health.PROBE_TIMEOUT_SECONDS,
            )


def probe_listen(endpoint: tuple[str, int], key: str) -> None:
    """Bind `endpoint` as gRPC will (SO_REUSEADDR, no SO_REUSEPORT) and let go: gRPC's own
    bind error says neither which address nor why, and logs lines of its own."""
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    with gateway_config.listening(key, endpoint, "the client API"), socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(endpoint)


def access_model(cfg: gateway_config.GatewayConfig) -> AccessModel:
    """The config's access rules, said in the log."""
    model = AccessModel.from_config(cfg)
    if model.compatibility:
        log.warning(
            "no [groups.*] in %s: every user reaches [auth] routes (%s), any protocol, and "
            "no other client (the compatibility mode); declare groups for per-group rules",
            cfg.path,
            ", ".join(cfg.auth.routes) or "none",
        )
    else:
        log.info(
            "access: %d group(s) (%s), %d rule(s)",
            len(model.groups),
            ", ".join(model.groups),
            sum(len(group.allow) for group in model.groups.values()),
        )
    return model


async def reload_access(path: str, sessions: SessionManager) -> bool:
    """SIGHUP: read the config's groups (and [auth] routes and dns, offered services)
    again and tell live sessions whose policy changed. A wrong file changes nothing:
    the last good rules stay, and the log says where the file is wrong."""
    try:
        cfg = gateway_config.load(path, auth=True)
    except gateway_config.ConfigError as error:
        log.error("reload refused, the last good access rules stay: %s", error)
        return False
    told = await sessions.set_access(access_model(cfg))
    log.info("reloaded %s: %d live session(s) got a new access policy", path, len(told))
    return True


def _provider(section: gateway_config.OidcSection | None) -> oidc.Provider | None:
    """The OpenID provider of [oidc], if there is one (discovery waits for the first
    single sign-on: a provider that is down must not keep the auth service from starting)."""
    if section is None:
        return None
    log.info("single sign-on with %s (client id %s)", section.issuer, section.client_id)
    return oidc.Provider(
        oidc.OidcSettings(
            issuer=section.issuer,
            client_id=section.client_id,
            public_client_secret=section.public_client_secret,
            scopes=section.scopes,
            username_claim=section.username_claim,
            groups_claim=section.groups_claim or None,
            auto_provision=section.auto_provision,
            http_timeout_seconds=section.http_timeout_seconds,
        )
    )


async def run(cfg: gateway_config.GatewayConfig) -> None:
    gw, auth = cfg.gateway, cfg.auth
    registry = CollectorRegistry()
    register_build_info(registry)
    # Ports first: one that is taken is the whole message, before anything else is done.
    with gateway_config.listening("[auth] metrics_listen", auth.metrics_listen, "metrics"):
        start_http_server(auth.metrics_listen[1], addr=auth.metrics_listen[0], registry=registry)
    listen = gateway_config.parse_host_port(auth.listen, "[auth] listen")
    probe_listen(listen, "[auth] listen")
    plan = raise_fd_limit(auth.max_connections)
    store = Store(gateway_config.database_location(auth))
    ProcessCollector(registry=registry)  # process_open_fds against process_max_fds
    metrics = AuthMetrics(registry)
    metrics.connections_limit.set(plan.connections)
    audit = AuditLog.open(auth.audit_log)

    def ended(session, reason: int, cause: int) -> None:
        audit.session_ended(session, reason, cause)
        log.info(
            "session=%#010x user=%r ended: %s%s",
            session.session_id,
            session.username,
            REMOVAL_NAMES.get(reason, reason),
            f" ({REVOCATION_NAMES.get(cause, cause)})" if cause else "",
        )

    sessions = SessionManager(
        store,
        AddressPool(gw.tunnel_network, gw.gateway_address, auth.address_quarantine_seconds),
        keepalive_seconds=gw.keepalive_seconds,
        session_lifetime_seconds=auth.session_lifetime_seconds,
        key_expiry_seconds=auth.key_expiry_seconds,
        allocated=lambda kind: metrics.allocations.labels(kind.value).inc(),
        max_sessions_per_user=auth.max_sessions_per_user,
        ended=ended,
        access=access_model(cfg),
        gateway_id=cfg.cluster.gateway_id if cfg.cluster else "",
    )
    # another gateway's auth service on a shared database changed sessions: catch up
    loop = asyncio.get_running_loop()
    store.db.listen(lambda: loop.call_soon_threadsafe(sessions.changed_elsewhere))
    host, port = cfg.cluster.this.dataplane if cfg.cluster else auth.dataplane_endpoint
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
        default_cipher=gw.cipher.api_code,
        response_template={
            "prefix": gw.tunnel_network.prefixlen,
            "gateway": str(gw.gateway_address),
            "mtu": gw.mtu,
            "keepalive": int(gw.keepalive_seconds),
            "key_lifetime": int(auth.key_lifetime_seconds),
            "endpoint": auth_pb2.Endpoint(host=host, port=port),
            "gateways": gateway_list(cfg.cluster, auth_pb2.Endpoint(host=host, port=port)),
        },
        audit=audit,
        renewal_lifetime=auth.renewal_lifetime_seconds,
        provider=_provider(cfg.oidc),
        auto_provision=cfg.oidc is not None and cfg.oidc.auto_provision,
    )
    servicer.update_gauges()

    public = grpc.aio.server(
        options=limits.server_options(plan),
        maximum_concurrent_rpcs=limits.MAX_CONCURRENT_RPCS,
        interceptors=[DatabaseGuard()],
    )
    public.add_generic_rpc_handlers((servicer.generic_handler(),))
    health_servicer = health.BoundedHealthServicer(limits.MAX_HEALTH_WATCHERS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, public)
    metrics.health_watchers.set_function(lambda: health_servicer.watchers)
    service_names = (
        auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    )
    if auth.reflection:
        reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME), public)
    cert_pem = _read(auth.tls_cert)
    credentials = grpc.ssl_server_credentials([(_read(auth.tls_key), cert_pem)])
    metrics.served_certificate(cert_pem)
    try:
        public.add_secure_port(auth.listen, credentials)
    except RuntimeError:  # taken since the probe
        raise gateway_config.ListenError(
            f"cannot listen on {auth.listen} for the client API ([auth] listen)"
        ) from None
    self_check = health.SelfCheck(health_servicer, ("", service_names[0]))
    metrics.self_check_age.set_function(self_check.age)
    probe = health.DatabaseProbe(store.db)
    await housekeeping(sessions, servicer, metrics, self_check, probe)
    await public.start()

    admin = grpc.aio.server(interceptors=[DatabaseGuard()])
    admin_servicer = AdminServicer(
        sessions,
        audit,
        caller=lambda peer: admin_socket.caller(peer),
        prefix=gw.tunnel_network.prefixlen,
        on_change=servicer.update_gauges,
    )
    admin_pb2_grpc.add_AdminServicer_to_server(admin_servicer, admin)
    # Served before the session feed (whose socket tells tests and scripts we are up).
    # Only this service's user and root: the admin API changes users and ends sessions.
    admin_socket = await serve_private(
        admin,
        auth.admin_socket,
        PeerPolicy.for_service(),
        on_refused=metrics.admin_peers_refused.inc,
        identify_callers=True,
    )
    control = grpc.aio.server(interceptors=[DatabaseGuard()])
    control_pb2_grpc.add_SessionFeedServicer_to_server(
        SessionFeedServicer(sessions, servicer.update_gauges), control
    )
    control_socket = await serve_private(
        control,
        gw.control_socket,
        PeerPolicy.for_service(gw.control_group),
        on_refused=metrics.control_peers_refused.inc,
    )
    log.info(
        "auth service up: clients %s (TLS), session feed unix:%s, admin unix:%s, "
        "metrics %s:%d, %d sessions, revision %d",
        auth.listen,
        gw.control_socket,
        auth.admin_socket,
        *auth.metrics_listen,
        store.count_sessions(),
        store.revision,
    )
    health.notify_systemd("READY=1")

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(reload_access(cfg.path, sessions))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)
        except TimeoutError:
            await housekeeping(sessions, servicer, metrics, self_check, probe)
    log.info("stopping")
    await public.stop(2)
    await control_socket.stop(1)
    await admin_socket.stop(1)
    probe.close()
    store.close()
    audit.close()


def _check(cfg: gateway_config.GatewayConfig, timeout: float) -> int:
    auth = cfg.auth
    listen = gateway_config.parse_host_port(auth.listen, "[auth] listen")
    try:
        problem = health.check(listen, _read(auth.ca_cert), _read(auth.tls_cert), timeout)
    except (OSError, ValueError) as error:
        problem = str(error)
    if problem:
        print(f"pushgate-auth: unhealthy: {problem}", file=sys.stderr)
        return 1
    print("pushgate-auth: healthy (SERVING)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushgate-auth",
        description="the gRPC auth service (client API over TLS, session feed on a Unix socket)",
    )
    add_version_argument(parser)
    parser.add_argument("--config", required=True, help="gateway config (TOML)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not serve: ask the running service's gRPC health over TLS; exit 0 if "
        "SERVING, 1 if not (for container and service health checks)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="for --check, seconds")
    logs.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure("pushgate-auth", args)
    try:
        cfg = gateway_config.load(args.config, auth=True)
        for path in (cfg.auth.tls_cert, cfg.auth.tls_key):
            _read(path)
        gateway_config.database_location(cfg.auth)
    except gateway_config.ConfigError as error:
        print(f"pushgate-auth: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"pushgate-auth: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    if args.check:
        return _check(cfg, args.timeout)
    try:
        asyncio.run(run(cfg))
    except (ControlSocketError, gateway_config.ListenError) as error:
        print(f"pushgate-auth: {error}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as error:  # at start; once up, it waits for the database
        print(f"pushgate-auth: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
