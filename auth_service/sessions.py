"""Sessions: creation at login, rekey, logout, expiry, the address pool, the feed.

Everything here runs on the auth service's event loop thread. Each change is one
store transaction that also bumps the feed revision and logs the change
(`session_changes`); the feed then publishes what the log holds after the last
change it published (`catch_up`), built from the store as it is now. That one path
serves this auth service's own changes (at once) and those other auth services on a
shared PostgreSQL made (when one NOTIFYs, and every second in the sweep), in
revision order: revisions commit in order (the revision row stays locked until
commit), so the log has no hole behind the newest change one can read.
"""

import asyncio
import hashlib
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from enum import StrEnum

from push_protocol.constants import (
    KEY_LEN,
    PREVIOUS_KEY_GRACE_SECONDS,
    REJECT_AFTER_SECONDS,
)
from push_protocol.keys import gateway_key
from push_protocol.session import next_epoch
from pushgate_api import auth_pb2, control_pb2
from pushgate_io.gateway_config import DEFAULT_ADDRESS_QUARANTINE_SECONDS

from .access import AccessModel
from .database import Conflict, DatabaseUnavailable
from .store import Release, Revocation, Store, StoredSession, User

log = logging.getLogger("pushgate.auth")

# `session_lifetime_seconds = 0` used to mean "no limit": a session then lived as long
# as it was rekeyed. It is capped here instead (a week), like any larger value.
MAX_SESSION_LIFETIME_SECONDS = 7 * 86400
# How long the auth service remembers a session an administrator ended, so that its
# client is told "access revoked" rather than "session gone" (a laptop that slept
# through the revocation asks when it wakes).
REVOKED_MEMORY_SECONDS = 7 * 86400
EVENT_LOG_SIZE = 10000  # events a reconnecting dataplane can catch up on without re-listing
# Send-counter ranges a listing leases beyond one per listed key: a dataplane asks
# for more (LeaseCounterRanges) only after this many installs and rekeys.
COUNTER_RANGES_AHEAD = 4096
MAX_COUNTER_RANGES_PER_LEASE = 65536
# Changes kept in the store's log beyond the newest: an auth service that falls further
# behind (cut off from a shared database) has its dataplane list everything again.
CHANGE_LOG_KEEP = 100_000
# A login whose address or session id another auth service took meanwhile tries again.
ALLOCATION_ATTEMPTS = 8


class PoolExhausted(Exception):
    pass


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class AllocationKind(StrEnum):
    """Which rule picked a login's tunnel address (the label of an auth metric)."""

    PREVIOUS = "previous"  # the user's own last address, free again (sticky)
    UNUSED = "unused"  # no record of anyone holding it
    RELEASED = "released"  # another user's, freed longer than the quarantine ago
    QUARANTINED = "quarantined"  # another user's, freed within the quarantine: none else free


class AddressPool:
    """Host addresses of the tunnel network, minus the gateway's, and the rules that pick
    one for a login (pure: the caller passes what is in use, what was freed, and now).

    A user gets back the address they held last if it is free. Otherwise an address
    nobody held (lowest first), then the one freed longest ago, so a freed address goes
    to a *different* user only after `quarantine_seconds`, while the kernel may still
    hold connection-tracking (NAT) state for it. Only if every free address is still in
    quarantine is the one freed longest ago handed out anyway: a login is not refused
    while addresses are free, and the dataplane deletes an ended session's conntrack
    state itself (dataplane/conntrack.py); the quarantine covers what that cannot
    (a dataplane that was down when the session ended, a deletion that failed).
    """

    def __init__(
        self,
        network,
        gateway,
        quarantine_seconds: float = DEFAULT_ADDRESS_QUARANTINE_SECONDS,
    ) -> None:
        self.network = network
        self.gateway = gateway
        self.quarantine = quarantine_seconds
        hosts = self._host_numbers()
        self.size = len(hosts) - (int(gateway) in hosts)

    def _host_numbers(self) -> range:
        """The hosts as integers, exactly as `network.hosts()` yields them (which is
        slow: an object each, and its text)."""
        network = self.network
        first, last = int(network.network_address), int(network.broadcast_address)
        if network.prefixlen < network.max_prefixlen - 1:
            first += 1  # not the network's (IPv6: the subnet-router anycast) address
            if network.version == 4:
                last -= 1  # nor the broadcast address
        return range(first, last + 1)

    def _candidates(self):
        """The text of every address the pool hands out, lowest first."""
        gateway = int(self.gateway)
        if self.network.version == 4:
            for number in self._host_numbers():
                if number != gateway:
                    yield socket.inet_ntoa(number.to_bytes(4, "big"))
        else:
            for number in self._host_numbers():
                if number != gateway:
                    yield str(ipaddress.IPv6Address(number))

    def __contains__(self, address: str) -> bool:
        """Whether `address` is one this pool hands out (as `network.hosts()` yields)."""
        try:
            host = ipaddress.ip_address(address)
        except ValueError:
            return False
        network = self.network
        if host not in network or host == self.gateway:
            return False
        if network.prefixlen >= network.max_prefixlen - 1:
            return True  # /31 and /32 (/127, /128): every address is a host
        if host == network.network_address:
            return False
        return network.version == 6 or host != network.broadcast_address

    def _text(self, number: int) -> str:
        if self.network.version == 4:
            return socket.inet_ntoa(number.to_bytes(4, "big"))
        return str(ipaddress.IPv6Address(number))

    def first_never_held(self, held) -> int:
        """The number of the lowest candidate not in `held` (texts), or past the last:
        where `never_held_from` starts walking (once, from a full read of the store)."""
        gateway = int(self.gateway)
        hosts = self._host_numbers()
        for number in hosts:
            if number != gateway and self._text(number) not in held:
                return number
        return hosts.stop

    def never_held_from(self, start: int, is_held) -> tuple[str | None, int]:
        """The lowest candidate from number `start` on that `is_held` (a store lookup)
        says nobody ever held, and where to start next time. Every candidate below
        `start` has been held: an address once held stays on record (live, or released),
        so the walk only ever moves up, one lookup per address over the pool's life."""
        gateway = int(self.gateway)
        hosts = self._host_numbers()
        for number in range(max(start, hosts.start), hosts.stop):
            if number == gateway:
                continue
            address = self._text(number)
            if not is_held(address):
                return address, number + 1
        return None, hosts.stop

    def decide(
        self,
        previous: str | None,
        never_held: str | None,
        oldest_freed: tuple[str, float] | None,
        now: float,
    ) -> tuple[str, AllocationKind]:
        """`allocate`'s rule on what the store found by index: the user's own newest
        freed address not in use, the lowest address nobody held, the address freed
        longest ago not in use (tests/test_address_pool.py holds both to the same
        answers)."""
        if previous is not None:
            return previous, AllocationKind.PREVIOUS
        if never_held is not None:
            return never_held, AllocationKind.UNUSED
        if oldest_freed is None:
            raise PoolExhausted(f"no free tunnel address in {self.network}")
        address, released_at = oldest_freed
        if now - released_at >= self.quarantine:
            return address, AllocationKind.RELEASED
        return address, AllocationKind.QUARANTINED

    def allocate(
        self, username: str, used: set[str], released: Mapping[str, Release], now: float
    ) -> tuple[str, AllocationKind]:
        """The address for a new session of `username` (the rule, stated on whole sets:
        the reference the store's indexed path, `SessionManager._allocate`, must match).
        `used` holds the addresses of live sessions; `released` says who last held a
        freed address, and when (only addresses of this pool: see `SessionManager`)."""
        mine = [
            (release.released_at, address)
            for address, release in released.items()
            if release.username == username and address not in used
        ]
        if mine:
            return max(mine)[1], AllocationKind.PREVIOUS
        if len(used | released.keys()) < self.size:  # else every address was held once
            for address in self._candidates():
                if address not in used and address not in released:
                    return address, AllocationKind.UNUSED
        freed = [
            (release.released_at, address)
            for address, release in released.items()
            if address not in used
        ]
        if not freed:
            raise PoolExhausted(f"no free tunnel address in {self.network}")
        released_at, address = min(freed)
        if now - released_at >= self.quarantine:
            return address, AllocationKind.RELEASED
        return address, AllocationKind.QUARANTINED


class SessionFeed:
    """Recent changes for dataplane watchers: a bounded log and a wake-up."""

    def __init__(self, first_revision: int) -> None:
        self.events: deque[control_pb2.SessionEvent] = deque(maxlen=EVENT_LOG_SIZE)
        self.oldest_replayable = first_revision  # events after this are in the log
        self.changed = asyncio.Condition()
        self.watchers = 0
        self.generation = 0  # bumped by `restart`: every watch then ends

    async def publish(self, *events: control_pb2.SessionEvent) -> None:
        # Appended before the first await, so events of one change stay together and
        # in revision order even when another change is published meanwhile.
        for event in events:
            if len(self.events) == self.events.maxlen:
                self.oldest_replayable = self.events[0].revision
            self.events.append(event)
        async with self.changed:
            self.changed.notify_all()

    async def restart(self, revision: int) -> None:
        """Changes up to `revision` cannot be replayed: end every watch, so that its
        dataplane lists the sessions again."""
        self.events.clear()
        self.oldest_replayable = revision
        self.generation += 1
        async with self.changed:
            self.changed.notify_all()

    def since(self, revision: int) -> list[control_pb2.SessionEvent]:
        return [event for event in self.events if event.revision > revision]


def session_lifetime(configured: float) -> float:
    """The lifetime sessions get: `configured`, capped at MAX_SESSION_LIFETIME_SECONDS
    (0, once "no limit", gets the cap too)."""
    if not configured or configured > MAX_SESSION_LIFETIME_SECONDS:
        return MAX_SESSION_LIFETIME_SECONDS
    return configured


def revocation_cause(user: User | None, created_at: float) -> int:
    """Why a session its user began at `created_at` must end now (an
    auth_pb2.RevocationCause), or 0 if it may go on. A user created after the
    session is a namesake of the one who was removed."""
    if user is None or user.created_at > created_at:
        return auth_pb2.REVOCATION_CAUSE_USER_REMOVED
    if user.disabled:
        return auth_pb2.REVOCATION_CAUSE_USER_DISABLED
    if user.password_changed_at is not None and user.password_changed_at > created_at:
        return auth_pb2.REVOCATION_CAUSE_PASSWORD_CHANGED
    return 0


# Called for every session that ends, once: (session, control_pb2.RemovalReason,
# auth_pb2.RevocationCause or 0 if no administrator ended it).
SessionEnded = Callable[[StoredSession, int, int], None]


def key_epoch_message(epoch, c2s, s2c, created_at) -> auth_pb2.SessionKeys:
    return auth_pb2.SessionKeys(
        key_epoch=epoch,
        client_to_server_key=c2s,
        server_to_client_key=s2c,
        created_at_unix_ms=_ms(created_at),
    )


class SessionManager:
    def __init__(
        self,
        store: Store,
        pool: AddressPool,
        *,
        keepalive_seconds: float,
        session_lifetime_seconds: float,
        key_expiry_seconds: float = REJECT_AFTER_SECONDS,
        allocated: Callable[[AllocationKind], None] | None = None,
        max_sessions_per_user: int = 3,
        ended: SessionEnded | None = None,
        access: AccessModel | None = None,
        gateway_id: str = "",
    ) -> None:
        self.store = store
        # This gateway's id in a cluster ("" alone): its dataplane gets the session
        # keys as this gateway uses them on the wire (push_protocol.keys.gateway_key).
        self.gateway_id = gateway_id
        # Who may reach what (None: nothing; tests of other parts). Policies by the
        # user's groups, and the digest the feed last carried for each live session.
        self.access = access
        self._policies: dict[tuple[str, ...], control_pb2.AccessPolicy] = {}
        self._sent: dict[int, str] = {}
        self.ended = ended or (lambda session, reason, cause: None)
        self.max_sessions_per_user = max_sessions_per_user
        self.pool = pool
        self.allocated = allocated  # told which rule picked each login's address
        # Records of addresses the pool no longer holds (the tunnel network changed)
        # would only confuse `allocate`'s count of addresses ever held.
        released = store.released_addresses()
        store.forget_released([a for a in released if a not in pool])
        # Where the walk for an address nobody held starts: found anew at every start
        # from the whole store, so rows changed while the service was down (a session
        # deleted by hand leaves no record) cannot hide an address below the mark.
        store.set_never_held_mark(
            str(pool.network), pool.first_never_held(store.used_addresses() | released.keys())
        )
        self.keepalive_seconds = keepalive_seconds
        self.session_lifetime = session_lifetime(session_lifetime_seconds)
        if self.session_lifetime != session_lifetime_seconds:
            log.warning(
                "session_lifetime_seconds = %g capped at %d (a week): revocation and "
                "re-authentication need sessions to end",
                session_lifetime_seconds,
                self.session_lifetime,
            )
        self.key_expiry = min(key_expiry_seconds, REJECT_AFTER_SECONDS)
        self.published = store.revision  # the feed holds every change up to this one
        self.feed = SessionFeed(self.published)
        self._following: asyncio.Task | None = None
        self._follow_again = False

    def _expiry(self, created_at: float, keys_at: float) -> float:
        return min(keys_at + self.key_expiry, created_at + self.session_lifetime)

    def policy_of(self, username: str) -> control_pb2.AccessPolicy:
        """The user's AccessPolicy, from their groups as they are now."""
        if self.access is None:
            return control_pb2.AccessPolicy()
        groups = tuple(self.store.groups_of(username))
        if groups not in self._policies:
            self._policies[groups] = self.access.policy(groups)
        return self._policies[groups]

    def network_of(self, username: str) -> auth_pb2.NetworkConfig:
        """What the user's client sets up (routes, DNS), from their groups as they are now."""
        if self.access is None:
            return auth_pb2.NetworkConfig()
        return self.access.network(self.store.groups_of(username))

    async def set_access(self, access: AccessModel) -> list[int]:
        """New rules (a reload): every live session whose policy changed is told."""
        self.access = access
        self._policies.clear()
        return await self.update_policies()

    async def update_policies(self, usernames=None) -> list[int]:
        """Tell the dataplane the policy of every live session (of `usernames`, or
        everyone's) whose policy is not what the feed last carried for it: a
        PolicyChange each, in one transaction. The ids of the sessions told."""
        changes = []
        for session_id, owner, _ in self.store.session_owners():
            if usernames is not None and owner not in usernames:
                continue
            policy = self.policy_of(owner)
            if self._sent.get(session_id) != policy.digest:
                changes.append(control_pb2.PolicyChange(session_id=session_id, policy=policy))
        if not changes:
            return []
        with self.store.transaction():
            for change in changes:
                self._log(change.session_id, "policy_changed")
            self.store.db.notify("policy_changed")
        await self.catch_up()
        return [change.session_id for change in changes]

    def to_message(self, s: StoredSession, now: float) -> control_pb2.Session:
        policy = self.policy_of(s.username)
        self._sent[s.session_id] = policy.digest
        message = control_pb2.Session(
            policy=policy,
            session_id=s.session_id,
            cipher=s.cipher,
            tunnel_addresses=[s.address],
            current_keys=self._wire_keys(s.key_epoch, s.c2s_key, s.s2c_key, s.keys_created_at),
            expires_at_unix_ms=_ms(s.expires_at),
            keepalive_seconds=int(self.keepalive_seconds),
            username=s.username,
            partial_checksums=bool(s.partial_checksums),
        )
        if s.previous_epoch is not None and s.previous_until and s.previous_until > now:
            message.previous_keys.CopyFrom(
                self._wire_keys(
                    s.previous_epoch, s.previous_c2s_key, s.previous_s2c_key, s.previous_created_at
                )
            )
            message.previous_keys_until_unix_ms = _ms(s.previous_until)
        return message

    def _wire_keys(self, epoch, c2s, s2c, created_at) -> auth_pb2.SessionKeys:
        """Keys of one epoch for this gateway's dataplane (the client derives the same
        from the keys its login and rekeys give it)."""
        if self.gateway_id:
            c2s, s2c = gateway_key(c2s, self.gateway_id), gateway_key(s2c, self.gateway_id)
        return key_epoch_message(epoch, c2s, s2c, created_at)

    def lease_counter_ranges(self, count: int) -> control_pb2.CounterRanges:
        """`count` send-counter ranges for a dataplane, never leased before."""
        with self.store.transaction():
            first = self.store.lease_counter_ranges(count)
        return control_pb2.CounterRanges(first=first, count=count)

    def listing(self, now: float) -> control_pb2.ListSessionsResponse:
        """Every live session, the revision to watch from, and counter ranges for
        every listed key and COUNTER_RANGES_AHEAD more. The sessions are read after
        the revision is taken: a change between the two is in the listing and in the
        feed, and the dataplane applies it twice to the same effect."""
        revision = self.published
        sessions = [self.to_message(s, now) for s in self.store.list_sessions()]
        return control_pb2.ListSessionsResponse(
            sessions=sessions,
            revision=revision,
            counter_ranges=self.lease_counter_ranges(2 * len(sessions) + COUNTER_RANGES_AHEAD),
        )

    @staticmethod
    def _new_session_id() -> int:
        """A random nonzero id; one already taken (a chance of one in 40,000 with
        100,000 sessions) fails the primary key, and the login tries again."""
        return secrets.randbelow(2**32 - 1) + 1

    def _log(self, session_id: int, kind: str, reason: int = 0) -> int:
        """Within a transaction: the change's revision, logged for every feed."""
        revision = self.store.next_revision()
        self.store.log_change(revision, session_id, kind, reason)
        return revision

    async def _commit(self, change, session_id: int, kind: str, reason: int = 0) -> None:
        """Run `change` and log it in one transaction, then publish."""
        with self.store.transaction():
            change()
            self._log(session_id, kind, reason)
            self.store.db.notify(kind)
        await self.catch_up()

    def _event(self, revision: int, session_id: int, kind: str, reason: int, now: float):
        """The feed's event for a logged change, from the session as it is now (None
        if it has ended since: its removal follows in the log)."""
        if kind == "removed":
            self._sent.pop(session_id, None)
            removal = control_pb2.SessionRemoval(session_id=session_id, reason=reason)
            return control_pb2.SessionEvent(revision=revision, removed=removal)
        session = self.store.session_by_id(session_id)
        if session is None:
            return None
        if kind == "installed":
            installed = self.to_message(session, now)
            return control_pb2.SessionEvent(revision=revision, installed=installed)
        if kind == "rotated":
            rotation = control_pb2.KeyRotation(
                session_id=session_id,
                keys=self._wire_keys(
                    session.key_epoch, session.c2s_key, session.s2c_key, session.keys_created_at
                ),
                expires_at_unix_ms=_ms(session.expires_at),
            )
            return control_pb2.SessionEvent(revision=revision, rotated=rotation)
        policy = self.policy_of(session.username)
        self._sent[session_id] = policy.digest
        change = control_pb2.PolicyChange(session_id=session_id, policy=policy)
        return control_pb2.SessionEvent(revision=revision, policy_changed=change)

    async def catch_up(self) -> int:
        """Publish every logged change after the last one published (this auth
        service's and other auth services'); how many. If the log no longer holds
        them all (this service was cut off longer than CHANGE_LOG_KEEP changes), the
        watching dataplanes are made to list again."""
        changes = self.store.changes_after(self.published)
        if not changes:
            return 0
        if changes[0][0] > self.published + 1 and self.store.oldest_change() > self.published:
            log.warning(
                "session changes %d..%d are no longer logged; the dataplane lists again",
                self.published + 1,
                changes[0][0] - 1,
            )
            self.published = changes[-1][0]
            await self.feed.restart(self.published)
            return len(changes)
        now = time.time()
        events = [event for change in changes if (event := self._event(*change, now))]
        # Read and advanced before the first await: two catch-ups never publish a change twice.
        self.published = changes[-1][0]
        if events:
            await self.feed.publish(*events)
        return len(changes)

    def changed_elsewhere(self) -> None:
        """Another auth service changed sessions (its NOTIFY, on the loop thread):
        catch up now; a notice during a catch-up runs one more."""
        self._follow_again = True
        if self._following is None or self._following.done():
            self._following = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while self._follow_again:
            self._follow_again = False
            try:
                await self.catch_up()
            except DatabaseUnavailable as error:  # the sweep tries again each second
                log.warning("catching up with session changes: %s", error)
                return

    def forget_old_changes(self) -> int:
        """Trim the change log to the last CHANGE_LOG_KEEP changes."""
        return self.store.forget_changes(self.published - CHANGE_LOG_KEEP)

    async def create(
        self,
        username: str,
        cipher: int,
        now: float,
        *,
        client_version: str = "",
        login_source: str = "",
        partial_checksums: bool = False,
    ) -> tuple[StoredSession, str, list[StoredSession]]:
        """A new session for `username`, and the sessions it replaced: the user's oldest
        ones beyond `max_sessions_per_user` (one transaction; the feed gets each removal,
        reason REPLACED, before the install, so the dataplane ends them too)."""
        for attempt in range(ALLOCATION_ATTEMPTS):
            try:
                created = self._create(
                    username,
                    cipher,
                    now,
                    client_version=client_version,
                    login_source=login_source,
                    partial_checksums=int(partial_checksums),
                )
                break
            except Conflict:  # another auth service took the address or the id first
                if attempt == ALLOCATION_ATTEMPTS - 1:
                    raise
        await self.catch_up()
        session, token, replaced, kind = created
        if self.allocated is not None:
            self.allocated(kind)
        for old in replaced:
            self.ended(old, control_pb2.REMOVAL_REASON_REPLACED, 0)
        return session, token, replaced

    def _allocate(self, username: str, now: float) -> tuple[str, AllocationKind]:
        """Within the allocation lock: the pool's rule (`AddressPool.allocate`) answered
        by indexed lookups, so a login costs the same with 100 or 100,000 live
        sessions. The lowest address nobody held is found by walking up from a mark
        kept in the store (set at start from a full read; with the network it belongs
        to, so that another gateway's different network starts over from one)."""
        store, pool = self.store, self.pool
        previous = store.previous_address(username)
        never_held = None
        if previous is None:
            network, start = store.never_held_mark()
            if network != str(pool.network):
                held = store.used_addresses() | store.released_addresses().keys()
                start = pool.first_never_held(held)
            never_held, mark = pool.never_held_from(start, store.is_held)
            store.set_never_held_mark(str(pool.network), mark)
        oldest = store.oldest_freed() if previous is None and never_held is None else None
        return pool.decide(previous, never_held, oldest, now)

    def _create(self, username, cipher, now, **client):
        """One attempt at `create`, in one transaction. The allocation lock makes
        auth services sharing a database take turns (none starves retrying); the
        unique constraints on address, id and token are what guarantee it."""
        with self.store.transaction():
            self.store.lock_allocation()
            existing = self.store.sessions_of(username)
            replaced = existing[: max(0, len(existing) + 1 - self.max_sessions_per_user)]
            for old in replaced:  # first: its address becomes this user's to take again
                if self.store.delete_session(old.session_id, now):
                    self._log(old.session_id, "removed", control_pb2.REMOVAL_REASON_REPLACED)
            token = secrets.token_urlsafe(32)
            address, kind = self._allocate(username, now)
            session = StoredSession.begun(
                self._new_session_id(),
                token_hash(token),
                username,
                address,
                cipher,
                now,
                self._expiry(now, now),
                **client,
            )
            self.store.add_session(session)
            self._log(session.session_id, "installed")
            self.store.db.notify("installed")
        if kind is AllocationKind.QUARANTINED:
            log.warning(
                "every free tunnel address was freed less than %g s ago; %s goes to user %r",
                self.pool.quarantine,
                address,
                username,
            )
        return session, token, replaced, kind

    def by_token(self, token: str) -> StoredSession | None:
        return self.store.session_by_token(token_hash(token)) if token else None

    async def rekey(self, session: StoredSession, now: float) -> StoredSession:
        session.previous_epoch = session.key_epoch
        session.previous_c2s_key, session.previous_s2c_key = session.c2s_key, session.s2c_key
        session.previous_created_at = session.keys_created_at
        session.previous_until = now + PREVIOUS_KEY_GRACE_SECONDS
        session.key_epoch = next_epoch(session.key_epoch)
        session.c2s_key, session.s2c_key = os.urandom(KEY_LEN), os.urandom(KEY_LEN)
        session.keys_created_at = session.last_rekey_at = now
        session.expires_at = self._expiry(session.created_at, now)
        await self._commit(lambda: self.store.save_session(session), session.session_id, "rotated")
        return session

    async def remove(
        self, session: StoredSession, reason: int, now: float | None = None, *, cause: int = 0
    ) -> bool:
        """End a session; its address is recorded as released at `now` (default: the
        wall clock, for callers that end sessions outside a timed sweep). With a
        `cause` (auth_pb2.RevocationCause) an administrator ended it: that is
        remembered, so its client learns it. False if it had ended already."""
        released_at = time.time() if now is None else now
        removed = []

        def change() -> None:
            removed.append(self.store.delete_session(session.session_id, released_at))
            if cause and removed[0]:
                self.store.remember_revoked(session, cause, released_at)
            if cause:  # its renewal token goes with it (auth_service/renewal.py)
                self.store.revoke_renewals(session.username, cause, session.session_id)

        await self._commit(change, session.session_id, "removed", reason)
        if removed[0]:
            self.ended(session, reason, cause)
        return removed[0]

    async def revoke(self, sessions: list[StoredSession], cause: int) -> list[StoredSession]:
        """End `sessions` as an administrator's doing (REMOVAL_REASON_ADMIN); those
        that were still live."""
        return [
            session
            for session in sessions
            if await self.remove(session, control_pb2.REMOVAL_REASON_ADMIN, cause=cause)
        ]

    async def revoke_stale(self, username: str | None = None) -> list[StoredSession]:
        """End the sessions (of `username`, or everyone's) whose user was removed,
        disabled or given a new password, by the admin API, by another process, or
        while the auth service was down (`revocation_cause`)."""
        users = {user.name: user for user in self.store.list_users()}
        ended = []
        for session_id, owner, created_at in self.store.session_owners():
            if username is not None and owner != username:
                continue
            cause = revocation_cause(users.get(owner), created_at)
            session = self.store.session_by_id(session_id) if cause else None
            if session is not None:
                ended += await self.revoke([session], cause)
        return ended

    async def still_allowed(self, session: StoredSession) -> bool:
        """Whether `session`'s user may still use it; if not, it is ended now."""
        cause = revocation_cause(self.store.get_user(session.username), session.created_at)
        if cause:
            await self.revoke([session], cause)
        return not cause

    def revocation(self, token: str) -> Revocation | None:
        """Why the session with `token` was ended by an administrator, if it was
        (remembered for REVOKED_MEMORY_SECONDS)."""
        return self.store.revocation(token_hash(token)) if token else None

    def forget_old_revocations(self, now: float) -> None:
        self.store.forget_revoked(now - REVOKED_MEMORY_SECONDS)

    async def expire(self, now: float) -> int:
        expired = self.store.expired_sessions(now)
        for session in expired:
            await self.remove(session, control_pb2.REMOVAL_REASON_EXPIRED, now)
        return len(expired)
