"""Health that means something: gRPC health on the client API port follows a self-check
that runs from the event loop, and `pushgate-auth --check` asks it over TLS.

The self-check (every sweep, about once a second) takes SQLite's write lock and
lets go, through its own connection in a worker thread: it passes only if the event
loop got to run it and the database would take a login's write. Its verdict sets
the health status (SERVING / NOT_SERVING). A wedged event loop cannot answer
Health.Check at all, which the checker reports as unhealthy after its timeout; the
metric `pushgate_auth_self_check_age_seconds`, computed at scrape time by the
metrics thread, shows it too. Under systemd (Type=notify) each passing self-check
also pets the watchdog, so a service that stops passing is restarted.
"""

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .database import DatabaseUnavailable

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The write lock must be had within this, or logins are stuck behind whoever holds it.
PROBE_TIMEOUT_SECONDS = 2.0


class BoundedHealthServicer(health.aio.HealthServicer):
    """The standard servicer with a cap on Health.Watch streams: each one is held
    open by the server, so without a cap one connection could open thousands."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def Watch(self, request, context) -> None:
        if self.watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.max_watchers} health watchers at once; use Check",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1


class DatabaseProbe:
    """Asks the database for a write (SQLite: its write lock on a connection of its
    own) or a round trip (PostgreSQL), on a thread of its own."""

    def __init__(self, database) -> None:
        self.database = database
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="self-check")

    def _probe(self) -> None:
        self.database.probe(PROBE_TIMEOUT_SECONDS)

    async def writable(self) -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._probe)
        except DatabaseUnavailable:
            return False
        return True

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class SelfCheck:
    """The service's health, decided by its self-check; `last_ok` is monotonic time."""

    def __init__(self, servicer: BoundedHealthServicer, services: tuple[str, ...]) -> None:
        self.servicer = servicer
        self.services = services
        self.last_ok = time.monotonic()
        self.serving: bool | None = None

    def age(self) -> float:
        """Seconds since the last passing self-check (read from any thread)."""
        return time.monotonic() - self.last_ok

    async def record(self, ok: bool) -> bool:
        """Sets the health status; returns whether it changed."""
        if ok:
            self.last_ok = time.monotonic()
            notify_systemd("WATCHDOG=1")
        changed = ok is not self.serving
        if changed:
            self.serving = ok
            for service in self.services:
                await self.servicer.set(service, SERVING if ok else NOT_SERVING)
        return changed


def certificate_name(pem: bytes) -> str:
    """The first name (DNS or IP) the server certificate is for: the checker connects to
    the listen address, which may be a wildcard, and verifies the certificate as that name."""
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    for kind in (x509.DNSName, x509.IPAddress):
        found = names.value.get_values_for_type(kind)
        if found:
            return str(found[0])
    raise ValueError("the server certificate names no host")


def check_target(listen: tuple[str, int]) -> str:
    host, port = listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check(listen: tuple[str, int], ca: bytes, server_cert: bytes, timeout: float) -> str | None:
    """None if the service answers SERVING within `timeout`, else why not."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", certificate_name(server_cert))]
    target = check_target(listen)
    with grpc.secure_channel(target, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"no answer from {target} within {timeout:g} s"
            return f"{target}: {error.code().name}: {error.details()}"
    if answer.status != SERVING:
        return (
            f"{target} reports {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
        )
    return None
