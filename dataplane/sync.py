"""The control channel: learn sessions from the auth service (list, then watch).

Runs on the event loop (grpc.aio), so registry changes happen on the loop
thread only. After any failure it backs off, lists again and reconciles: the
sessions that did not change keep their counters and replay windows, traffic
of existing sessions keeps flowing while the auth service is away.
"""

import asyncio
import logging
import random
import time

import grpc

from push_protocol.aead import CipherSuite
from push_protocol.constants import PREVIOUS_KEY_GRACE_SECONDS
from push_protocol.drops import UsageError
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession
from pushgate_api import auth_pb2, control_pb2, control_pb2_grpc

from .metrics import Counters
from .registry import Registry, SessionRecord, packed_address

log = logging.getLogger("pushgate.dataplane.sync")

RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0

CIPHERS = {
    auth_pb2.CIPHER_SUITE_AES_256_GCM: CipherSuite.AES_256_GCM,
    auth_pb2.CIPHER_SUITE_CHACHA20_POLY1305: CipherSuite.CHACHA20_POLY1305,
}


def key_material(keys: auth_pb2.SessionKeys) -> KeyMaterial:
    return KeyMaterial(
        keys.key_epoch,
        keys.client_to_server_key,
        keys.server_to_client_key,
        keys.created_at_unix_ms / 1000,
    )


class SessionSync:
    def __init__(
        self, registry: Registry, counters: Counters, socket_path: str, clock=time.time
    ) -> None:
        self.registry = registry
        self.counters = counters
        self.target = f"unix:{socket_path}"
        self.clock = clock
        self.revision = 0
        self.synced = asyncio.Event()

    async def run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    stub = control_pb2_grpc.SessionFeedStub(channel)
                    listing = await stub.ListSessions(control_pb2.ListSessionsRequest(), timeout=30)
                    self.reconcile(listing)
                    delay = RETRY_FIRST_SECONDS
                    self.counters.control_connected = 1
                    watch = stub.WatchSessions(
                        control_pb2.WatchSessionsRequest(after_revision=self.revision)
                    )
                    async for event in watch:
                        self.apply(event)
                    log.warning("session feed ended; listing again")
            except grpc.aio.AioRpcError as error:
                self.counters.control_connected = 0
                log.warning(
                    "session feed %s: %s %s; retrying in %.1f s",
                    self.target,
                    error.code().name,
                    error.details(),
                    delay,
                )
            self.counters.control_connected = 0
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(RETRY_MAX_SECONDS, delay * 2)

    # -- applying what the auth service says (loop thread) -----------------------

    def reconcile(self, listing: control_pb2.ListSessionsResponse) -> None:
        listed = {session.session_id: session for session in listing.sessions}
        for session_id in list(self.registry.by_id):
            if session_id not in listed:
                self._remove(session_id, "gone from the auth service")
        for session in listing.sessions:
            record = self.registry.by_id.get(session.session_id)
            if record is None:
                self._install(session)
                continue
            self._update(record, session)
        self.revision = listing.revision
        self.counters.control_resyncs += 1
        self.synced.set()
        log.info("session feed synced: %d sessions at revision %d", len(listed), self.revision)

    def apply(self, event: control_pb2.SessionEvent) -> None:
        change = event.WhichOneof("change")
        if change == "installed":
            existing = self.registry.by_id.get(event.installed.session_id)
            if existing is None:
                self._install(event.installed)
            else:
                self._update(existing, event.installed)
        elif change == "rotated":
            record = self.registry.by_id.get(event.rotated.session_id)
            if record is not None:
                if event.rotated.expires_at_unix_ms:  # a rekey moves the expiry
                    record.expires_at = event.rotated.expires_at_unix_ms / 1000
                self._rotate(record, event.rotated.keys)
        elif change == "removed":
            self._remove(
                event.removed.session_id, control_pb2.RemovalReason.Name(event.removed.reason)
            )
        self.revision = event.revision

    def _install(self, session: control_pb2.Session) -> None:
        now = self.clock()
        cipher = CIPHERS.get(session.cipher)
        if cipher is None:
            log.error(
                "session %#010x: unknown cipher %d; not installed",
                session.session_id,
                session.cipher,
            )
            return
        try:
            tunnel = TunnelSession(
                session.session_id,
                cipher,
                Role.SERVER,
                key_material(session.current_keys),
                now,
                keepalive_interval=float(session.keepalive_seconds or 10),
            )
            if session.HasField("previous_keys"):
                tunnel.restore_previous(
                    key_material(session.previous_keys), now, now + PREVIOUS_KEY_GRACE_SECONDS
                )
            addresses = tuple(packed_address(a) for a in session.tunnel_addresses)
        except (UsageError, ValueError) as error:
            log.error("session %#010x not installed: %s", session.session_id, error)
            return
        self.registry.add(
            SessionRecord(
                tunnel,
                addresses,
                session.expires_at_unix_ms / 1000,
                session.username,
                installed_at=now,
            )
        )
        self.counters.session_installs += 1
        log.info(
            "session %#010x installed for %s at %s",
            session.session_id,
            session.username,
            ", ".join(session.tunnel_addresses),
        )

    def _update(self, record: SessionRecord, session: control_pb2.Session) -> None:
        """Make an installed session match what the auth service says about it."""
        record.expires_at = session.expires_at_unix_ms / 1000
        try:
            addresses = tuple(packed_address(a) for a in session.tunnel_addresses)
        except ValueError as error:
            log.error("session %#010x: bad address: %s", session.session_id, error)
            return
        if addresses != record.addresses:
            self.registry.readdress(record, addresses)
        self._rotate(record, session.current_keys)

    def _rotate(self, record: SessionRecord, keys: auth_pb2.SessionKeys) -> None:
        tunnel = record.tunnel
        if keys.key_epoch == tunnel.current.epoch or (
            tunnel.next is not None and keys.key_epoch == tunnel.next.epoch
        ):
            return  # already have them: keep counters and replay windows
        try:
            tunnel.install_next(key_material(keys), self.clock())
        except UsageError as error:
            log.error("session %#010x: rotation refused: %s", record.session_id, error)
            return
        self.counters.session_rekeys += 1
        log.info("session %#010x: key epoch %d installed", record.session_id, keys.key_epoch)

    def _remove(self, session_id: int, why: str) -> None:
        if self.registry.remove(session_id) is not None:
            self.counters.session_removals += 1
            log.info("session %#010x removed (%s)", session_id, why)
