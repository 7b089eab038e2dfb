"""The control channel: learn sessions from the auth service (list, then watch).

Runs on the event loop (grpc.aio), so registry changes happen on the loop
thread only. After any failure it backs off, lists again and reconciles: the
sessions that did not change keep their counters and replay windows, traffic
of existing sessions keeps flowing while the auth service is away.

Keys learned from a listing that the registry does not hold already may have
been received with by an earlier incarnation of this process, whose replay
windows are gone: they are installed *re-learned* (authenticated packets under
them are refused and answered with REKEY_REQUIRED). Keys from watch events were
minted after the listing and are fresh. Every keypair seals in its own
send-counter range, leased from the auth service (docs/protocol.md, "Restarts").

Each session carries its access policy; sessions whose policies are equal share
one compiled lookup (`PolicyBook`), and a policy change applies at once. A
session without a policy, or with one that does not compile, reaches nothing.
"""

import asyncio
import logging
import time
import weakref
from collections import deque

import grpc

from push_protocol.aead import CipherSuite, check_key
from push_protocol.backoff import Backoff
from push_protocol.drops import UsageError
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd
from push_protocol.policy import NO_POLICY, CompiledPolicy, PolicyError, rules_from_messages
from push_protocol.session import TunnelSession
from pushgate_api import auth_pb2, control_pb2, control_pb2_grpc
from pushgate_io.control_socket import PeerPolicy, checked_target

from .metrics import Counters
from .registry import Registry, SessionRecord, packed_address

log = logging.getLogger("pushgate.dataplane.sync")

RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# Lease more send-counter ranges while a few installs' worth remain: one event
# needs at most two, and a lease is one small RPC and one store write.
COUNTER_RANGES_LOW_WATER = 64
COUNTER_RANGES_PER_LEASE = 4096
# Keys minted this far after our own clock's now are refused: the auth service
# runs on the same host (or one in step with it), and a key from the future
# would outlive its age limit (REJECT_AFTER_SECONDS) by as much.
MAX_KEY_CLOCK_AHEAD_SECONDS = 5.0


def key_material(keys: auth_pb2.SessionKeys) -> KeyMaterial:
    return KeyMaterial(
        keys.key_epoch,
        keys.client_to_server_key,
        keys.server_to_client_key,
        keys.created_at_unix_ms / 1000,
    )


class FeedRefused(Exception):
    """What the auth service sent cannot be installed (bad input, not our bug): the
    session or rotation is logged and skipped, the feed goes on."""


class KeysFromTheFuture(FeedRefused):
    """The auth service's clock is ahead of ours: its keys would outlive their limit."""


class CounterRangePool:
    """Send-counter ranges leased from the auth service; each keypair takes one."""

    def __init__(self) -> None:
        self._leases: deque[list[int]] = deque()  # [next, end) each
        self.available = 0

    def add(self, lease: control_pb2.CounterRanges) -> None:
        if lease.count:
            self._leases.append([lease.first, lease.first + lease.count])
            self.available += lease.count

    def take(self) -> int:
        if not self._leases:
            raise FeedRefused("no send-counter range left: the auth service leased none")
        lease = self._leases[0]
        counter_range = lease[0]
        lease[0] += 1
        if lease[0] == lease[1]:
            self._leases.popleft()
        self.available -= 1
        return counter_range


class PolicyBook:
    """One compiled policy per distinct AccessPolicy (its digest and its rules: the
    digest names the rule set, the rules are what is enforced), shared by every
    session that has it, forgotten when no session holds it any more."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._compiled: weakref.WeakValueDictionary[bytes, CompiledPolicy] = (
            weakref.WeakValueDictionary()
        )

    def __len__(self) -> int:
        return len(self._compiled)

    def get(self, session: control_pb2.Session | control_pb2.PolicyChange) -> CompiledPolicy:
        """The compiled policy of a feed session or policy change; NO_POLICY when it
        has none or one that cannot be enforced (logged: the auth service's error)."""
        if not session.HasField("policy"):
            return NO_POLICY
        message = session.policy
        key = message.SerializeToString(deterministic=True)
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = CompiledPolicy(rules_from_messages(message.allow), message.digest)
            except PolicyError as error:
                self.counters.policies_refused += 1
                log.error(
                    "session %#010x: access policy %s refused, it reaches nothing: %s",
                    session.session_id,
                    message.digest or "(no digest)",
                    error,
                )
                return NO_POLICY
            self._compiled[key] = compiled
            self.counters.policy_compiles += 1
        return compiled


class SessionSync:
    def __init__(
        self,
        registry: Registry,
        counters: Counters,
        socket_path: str,
        clock=time.time,
        peers: PeerPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.counters = counters
        self.socket_path = socket_path
        self.peers = peers or PeerPolicy.for_service()  # whose feed we take
        self.clock = clock
        self.revision = 0
        self.synced = asyncio.Event()
        self.counter_ranges = CounterRangePool()
        self.policies = PolicyBook(counters)

    def _refused(self) -> None:
        self.counters.control_peers_refused["feed"] += 1

    async def run(self) -> None:
        # gRPC reaches the feed through a relay that first checks who serves it
        # (control_socket): a feed served by another user is refused, never read.
        async with checked_target(
            self.socket_path,
            self.peers,
            name=f"session feed {self.socket_path}",
            on_refused=self._refused,
        ) as (target, _):
            await self._run(target)

    async def _run(self, target: str) -> None:
        backoff = Backoff(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
        while True:
            try:
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = control_pb2_grpc.SessionFeedStub(channel)
                    listing = await stub.ListSessions(control_pb2.ListSessionsRequest(), timeout=30)
                    self.counter_ranges.add(listing.counter_ranges)
                    self.reconcile(listing)
                    backoff.reset()
                    self.counters.control_connected = 1
                    watch = stub.WatchSessions(
                        control_pb2.WatchSessionsRequest(after_revision=self.revision)
                    )
                    async for event in watch:
                        if self.counter_ranges.available < COUNTER_RANGES_LOW_WATER:
                            self.counter_ranges.add(
                                await stub.LeaseCounterRanges(
                                    control_pb2.LeaseCounterRangesRequest(
                                        count=COUNTER_RANGES_PER_LEASE
                                    ),
                                    timeout=30,
                                )
                            )
                        self.apply(event)
                    log.warning("session feed ended; listing again")
            except grpc.aio.AioRpcError as error:
                self.counters.control_connected = 0
                delay = backoff.next_delay()
                log.warning(
                    "session feed %s: %s %s; retrying in %.1f s",
                    self.socket_path,
                    error.code().name,
                    error.details(),
                    delay,
                )
            else:
                delay = backoff.next_delay()
            self.counters.control_connected = 0
            await asyncio.sleep(delay)

    # -- applying what the auth service says (loop thread) -----------------------

    def reconcile(self, listing: control_pb2.ListSessionsResponse) -> None:
        listed = {session.session_id: session for session in listing.sessions}
        for session_id in list(self.registry.by_id):
            if session_id not in listed:
                self._remove(session_id, "gone from the auth service", SessionEnd.CLOSED)
        for session in listing.sessions:
            record = self.registry.by_id.get(session.session_id)
            if record is None:
                self._install(session, relearned=True)
                continue
            self._update(record, session, relearned=True)
        self.revision = self.counters.feed_revision = listing.revision
        self.counters.control_resyncs += 1
        self.synced.set()
        log.info("session feed synced: %d sessions at revision %d", len(listed), self.revision)

    def apply(self, event: control_pb2.SessionEvent) -> None:
        change = event.WhichOneof("change")
        if change == "installed":
            existing = self.registry.by_id.get(event.installed.session_id)
            if existing is None:
                self._install(event.installed, relearned=False)
            else:
                self._update(existing, event.installed, relearned=False)
        elif change == "rotated":
            record = self.registry.by_id.get(event.rotated.session_id)
            if record is not None:
                if event.rotated.expires_at_unix_ms:  # a rekey moves the expiry
                    record.expires_at = event.rotated.expires_at_unix_ms / 1000
                self._rotate(record, event.rotated.keys, relearned=False)
        elif change == "removed":
            reason = event.removed.reason
            self._remove(
                event.removed.session_id,
                control_pb2.RemovalReason.Name(reason),
                SessionEnd.EXPIRED
                if reason == control_pb2.REMOVAL_REASON_EXPIRED
                else SessionEnd.CLOSED,
            )
        elif change == "policy_changed":
            record = self.registry.by_id.get(event.policy_changed.session_id)
            if record is not None:
                self._set_policy(record, event.policy_changed)
        self.revision = self.counters.feed_revision = event.revision

    def _key_material(
        self, keys: auth_pb2.SessionKeys, suite: CipherSuite, now: float
    ) -> KeyMaterial:
        """The keys the feed sent, checked as input: what the protocol core would
        refuse as a bug (a UsageError) is the auth service's error here."""
        try:
            material = key_material(keys)
            check_key(suite, material.client_to_server)
            check_key(suite, material.server_to_client)
        except UsageError as error:
            raise FeedRefused(f"key epoch {keys.key_epoch}: {error}") from None
        ahead = material.created_at - now
        if ahead > MAX_KEY_CLOCK_AHEAD_SECONDS:
            self.counters.keys_refused += 1
            raise KeysFromTheFuture(
                f"key epoch {material.epoch} was created {ahead:.0f} s after our clock's now"
                " (is the clock of this host or of the auth service's wrong?)"
            )
        return material

    def _install(self, session: control_pb2.Session, *, relearned: bool) -> None:
        now = self.clock()
        cipher = CipherSuite.from_api_code(session.cipher)
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
                self._key_material(session.current_keys, cipher, now),
                keepalive_interval=float(session.keepalive_seconds or 10),
                counter_range=self.counter_ranges.take(),
                relearned=relearned,
            )
            previous_until = session.previous_keys_until_unix_ms / 1000
            if session.HasField("previous_keys") and previous_until > now:
                if session.previous_keys.key_epoch == session.current_keys.key_epoch:
                    raise FeedRefused(f"previous keys of the current epoch {tunnel.current.epoch}")
                tunnel.restore_previous(
                    self._key_material(session.previous_keys, cipher, now),
                    previous_until,  # the grace the rekey gave, not a new one
                    counter_range=self.counter_ranges.take(),
                )
            addresses = tuple(packed_address(a) for a in session.tunnel_addresses)
        except (FeedRefused, ValueError) as error:  # ValueError: an address that isn't one
            log.error("session %#010x not installed: %s", session.session_id, error)
            return
        self.registry.add(
            SessionRecord(
                tunnel,
                addresses,
                session.expires_at_unix_ms / 1000,
                session.username,
                installed_at=now,
                policy=self.policies.get(session),
                partial_checksums=session.partial_checksums,
            )
        )
        self.counters.session_installs += 1
        log.info(
            "session %#010x installed for %s at %s%s",
            session.session_id,
            session.username,
            ", ".join(session.tunnel_addresses),
            " (keys re-learned: the client is asked to rekey)" if relearned else "",
        )

    def _update(
        self, record: SessionRecord, session: control_pb2.Session, *, relearned: bool
    ) -> None:
        """Make an installed session match what the auth service says about it."""
        record.expires_at = session.expires_at_unix_ms / 1000
        self._set_policy(record, session)
        try:
            addresses = tuple(packed_address(a) for a in session.tunnel_addresses)
        except ValueError as error:
            log.error("session %#010x: bad address: %s", session.session_id, error)
            return
        if addresses != record.addresses:
            self.registry.readdress(record, addresses)
        self._rotate(record, session.current_keys, relearned=relearned)

    def _set_policy(
        self, record: SessionRecord, source: control_pb2.Session | control_pb2.PolicyChange
    ) -> None:
        policy = self.policies.get(source)
        if policy is not record.policy:
            record.policy = policy
            log.info(
                "session %#010x: access policy %s (%d rules)",
                record.session_id,
                policy.digest or "(none)",
                policy.rule_count,
            )

    def _rotate(
        self, record: SessionRecord, keys: auth_pb2.SessionKeys, *, relearned: bool
    ) -> None:
        tunnel = record.tunnel
        if keys.key_epoch == tunnel.current.epoch or (
            tunnel.next is not None and keys.key_epoch == tunnel.next.epoch
        ):
            return  # already have them: keep counters and replay windows
        now = self.clock()
        try:
            tunnel.install_next(
                self._key_material(keys, tunnel.suite, now),
                now,
                counter_range=self.counter_ranges.take(),
                relearned=relearned,
            )
        except FeedRefused as error:
            log.error("session %#010x: rotation refused: %s", record.session_id, error)
            return
        self.counters.session_rekeys += 1
        log.info("session %#010x: key epoch %d installed", record.session_id, keys.key_epoch)

    def _remove(self, session_id: int, why: str, end: SessionEnd) -> None:
        if self.registry.remove(session_id, end) is not None:
            self.counters.session_removals += 1
            log.info("session %#010x removed (%s)", session_id, why)
