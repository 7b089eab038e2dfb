"""THE session registry: one record per session, indexed by id and by tunnel address.

Only the event loop thread touches it. Records are created and removed only by
the control channel (dataplane/sync.py); the receive loop only reads it and
updates a record's endpoint and stats after a packet authenticated. Observers
hear of every session id added and removed and of every address a session stops
owning (the kernel socket filter's set of live ids, the conntrack cleaner), so
they stay in step with the one registry.
"""

import ipaddress
from collections import Counter

from push_protocol.drops import DropReason, UsageError
from push_protocol.lifecycle import SessionEnd, SessionState
from push_protocol.policy import NO_POLICY, CompiledPolicy
from push_protocol.session import TunnelSession


class SessionRecord:
    __slots__ = (
        "addresses",
        "drops",
        "endpoint",
        "expires_at",
        "installed_at",
        "last_drop_reason",
        "partial_checksums",
        "policy",
        "stalled",
        "tunnel",
        "username",
    )

    def __init__(
        self,
        tunnel: TunnelSession,
        addresses: tuple[bytes, ...],
        expires_at: float,
        username: str = "",
        installed_at: float = 0.0,
        policy: CompiledPolicy = NO_POLICY,
        partial_checksums: bool = False,
    ) -> None:
        self.tunnel = tunnel
        # its client completes partial TCP checksums (pushgate_io/tso.py)
        self.partial_checksums = partial_checksums
        self.installed_at = installed_at
        self.addresses = addresses  # raw 4- or 16-byte addresses the session owns
        self.expires_at = expires_at  # 0: no expiry
        self.username = username
        self.policy = policy  # what it may reach (shared with sessions of the same rules)
        self.endpoint: tuple[str, int] | None = None  # follows authenticated packets
        self.last_drop_reason: DropReason | None = None
        self.drops: Counter[DropReason] = Counter()  # this session's, by reason (admin listing)
        self.stalled = False

    @property
    def session_id(self) -> int:
        return self.tunnel.session_id


def packed_address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


class RegistryObserver:
    """What the registry tells its observers; each overrides what it needs."""

    def session_added(self, session_id: int) -> None:
        pass

    def session_removed(self, session_id: int) -> None:
        pass

    def address_released(self, address: bytes) -> None:
        """A session stopped owning `address` (removed, readdressed, or the address
        was taken by a newer session): the kernel's NAT state for it can go
        (dataplane/conntrack.py) before anyone else uses it."""


class Registry:
    def __init__(self) -> None:
        self.by_id: dict[int, SessionRecord] = {}
        self.by_address: dict[bytes, SessionRecord] = {}
        self._observers: list[RegistryObserver] = []

    def observe(self, observer: RegistryObserver) -> None:
        """Tell `observer` every session id installed now and from now on, every one
        removed, and every address released from now on."""
        self._observers.append(observer)
        for session_id in self.by_id:
            observer.session_added(session_id)

    def _released(self, address: bytes) -> None:
        for observer in self._observers:
            observer.address_released(address)

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, record: SessionRecord) -> None:
        """Add a new session; an address already owned moves to the new session."""
        if record.session_id in self.by_id:
            raise UsageError(f"session {record.session_id:#010x} is already installed")
        self.by_id[record.session_id] = record
        for address in record.addresses:
            previous = self.by_address.get(address)
            if previous is not None:
                previous.addresses = tuple(a for a in previous.addresses if a != address)
                self._released(address)
            self.by_address[address] = record
        for observer in self._observers:
            observer.session_added(record.session_id)

    def readdress(self, record: SessionRecord, addresses: tuple[bytes, ...]) -> None:
        """Give an installed session a new set of addresses (taken from others if owned)."""
        for address in record.addresses:
            if self.by_address.get(address) is record:
                del self.by_address[address]
                if address not in addresses:
                    self._released(address)
        record.addresses = addresses
        for address in addresses:
            previous = self.by_address.get(address)
            if previous is not None and previous is not record:
                previous.addresses = tuple(a for a in previous.addresses if a != address)
                self._released(address)
            self.by_address[address] = record

    def remove(self, session_id: int, why: SessionEnd) -> SessionRecord | None:
        """Forget a session that ended for `why` (None if it is not installed)."""
        record = self.by_id.pop(session_id, None)
        if record is None:
            return None
        for observer in self._observers:
            observer.session_removed(session_id)
        for address in record.addresses:
            if self.by_address.get(address) is record:
                del self.by_address[address]
                self._released(address)
        record.tunnel.end(why)
        return record

    def count_by_state(self) -> dict[SessionState, int]:
        counts = dict.fromkeys(SessionState, 0)
        for record in self.by_id.values():
            counts[record.tunnel.state] += 1
        return counts
