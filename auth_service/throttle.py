"""Failed-login throttling that an attacker cannot turn against a user (pure, `now` passed in).

A login for USER from address A is counted on up to three keys, where A's
*source* is A itself for IPv4 and its /64 for IPv6 (one host's share):

- (USER, source): `Limits.account_source` free failures. Guessing one account
  from one place is slowed; the account stays open from everywhere else.
- source: `Limits.source` free failures, for every user name together. A
  password spray across many users from one place is slowed.
- IPv4 /24 of A: `Limits.network` free failures. A spray from many addresses of
  one network is slowed, but only for addresses that have failed themselves:
  a neighbour that has not failed is never refused.

So a correct password from a source that has not failed is never refused
(nothing that could refuse it has counted a failure). A spray across many
sources locks nobody out: `SprayWatch` makes it visible instead.

Past a key's free failures each further one doubles a delay (from `base_delay`
up to `max_delay`) during which attempts on that key are refused without
checking the password; a record quiet for `max_delay` is forgotten, so no key
stays blocked longer than that.

An attempt is counted when it starts (`begin` reserves it on every key) and
settled when its password check ends (`finish`). While attempts on a key are in
flight, a new one may start only if all of them failing would not have blocked
it; otherwise it waits for one to settle. So at most `free + 1` guesses per key
ever reach the password hash, however many arrive at once, and concurrent
correct logins only queue briefly.

Memory is bounded: `prune` forgets quiet records, and at `max_records` the
record with the oldest failure that has nothing in flight is evicted. Records
are only created by attempts that reach the password hash, so pushing one out
costs an attacker `max_records` hashes; with the defaults that takes longer than
a record lives without new failures anyway (see README, "Login throttling").
"""

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


class Outcome(enum.Enum):
    FAILED = "failed"  # the password check ran and said no
    SUCCEEDED = "succeeded"
    ABANDONED = "abandoned"  # the check never ran to the end (e.g. the call was cancelled)


@dataclass(frozen=True)
class Limits:
    """Free failures per key kind before delays start."""

    account_source: int = 5
    source: int = 20
    network: int = 100


@dataclass(frozen=True)
class LoginKeys:
    account_source: str
    source: str
    network: str | None  # IPv4 only: an IPv6 source is already a whole /64


@dataclass(frozen=True)
class Verdict:
    """`begin`'s answer: go (reserved on every key), wait (for an attempt in
    flight to settle, then ask again), or refused for `retry_after` seconds."""

    go: bool
    retry_after: float = 0.0

    @property
    def wait(self) -> bool:
        return not self.go and self.retry_after == 0.0


GO = Verdict(True)
WAIT = Verdict(False)


def source_of(address: str) -> tuple[str, str | None]:
    """(source, IPv4 /24 or None) for a peer address; anything that is not an IP
    (a Unix socket peer) is its own source."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address, None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip), str(ipaddress.ip_network(f"{ip}/24", strict=False))
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)), None


def login_keys(user: str, address: str) -> LoginKeys:
    source, network = source_of(address)
    # Kinds are prefixed; a source never contains "|", so a user name cannot forge a key.
    return LoginKeys(
        account_source=f"a|{source}|{user}",
        source=f"s|{source}",
        network=f"n|{network}" if network else None,
    )


class _Record:
    __slots__ = ("blocked_until", "failures", "last_failure", "pending")

    def __init__(self) -> None:
        self.failures = 0
        self.pending = 0
        self.blocked_until = 0.0
        self.last_failure = 0.0


class Throttle:
    def __init__(
        self, limits: Limits, base_delay: float, max_delay: float, max_records: int
    ) -> None:
        self.limits = limits
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_records = max_records
        self.evicted = 0  # records pushed out at the bound (exported as a metric)
        self._records: OrderedDict[str, _Record] = OrderedDict()  # oldest failure first

    def _free(self, key: str) -> int:
        kind = key[0]
        if kind == "a":
            return self.limits.account_source
        return self.limits.source if kind == "s" else self.limits.network

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and self._stale(record, now):
            del self._records[key]
            return None
        return record

    def _stale(self, record: _Record, now: float) -> bool:
        return (
            record.pending == 0
            and now - record.last_failure > self.max_delay
            and now >= record.blocked_until
        )

    def _verdict(self, key: str, now: float) -> Verdict:
        record = self._live(key, now)
        if record is None:
            return GO
        if now < record.blocked_until:
            return Verdict(False, record.blocked_until - now)
        if record.pending and record.failures + record.pending > self._free(key):
            return WAIT  # had those in flight all failed, this one would be refused
        return GO

    def begin(self, keys: LoginKeys, now: float) -> Verdict:
        """Whether an attempt may check its password now; if so it is reserved on
        every key and must be settled with `finish`."""
        checked = [keys.account_source, keys.source]
        source = self._live(keys.source, now)
        if keys.network and source is not None and source.failures:
            checked.append(keys.network)  # the /24 slows only sources that failed
        verdicts = [self._verdict(key, now) for key in checked]
        refused = max(v.retry_after for v in verdicts)
        if refused > 0:
            return Verdict(False, refused)
        if not all(v.go for v in verdicts):
            return WAIT
        for key in self._keys(keys):
            self._record(key, now).pending += 1
        return GO

    def finish(self, keys: LoginKeys, now: float, outcome: Outcome) -> None:
        for key in self._keys(keys):
            record = self._records[key]
            record.pending -= 1
            if outcome is Outcome.FAILED:
                record.failures += 1
                record.last_failure = now
                self._records.move_to_end(key)
                excess = record.failures - self._free(key)
                if excess > 0:
                    delay = min(self.max_delay, self.base_delay * 2 ** min(excess - 1, 64))
                    record.blocked_until = now + delay
            elif outcome is Outcome.SUCCEEDED and key == keys.account_source:
                # The account's own record only: a success must not wipe what a
                # source has failed for other accounts (one known password would
                # otherwise reset a spray's count).
                record.failures, record.blocked_until = 0, 0.0
            if record.pending == 0 and record.failures == 0:
                del self._records[key]

    @staticmethod
    def _keys(keys: LoginKeys) -> tuple[str, ...]:
        return tuple(k for k in (keys.account_source, keys.source, keys.network) if k)

    def _record(self, key: str, now: float) -> _Record:
        record = self._live(key, now)
        if record is None:
            if len(self._records) >= self.max_records:
                self._evict_one()
            record = self._records[key] = _Record()
        return record

    def _evict_one(self) -> None:
        for key, record in self._records.items():  # oldest failure first
            if record.pending == 0:
                del self._records[key]
                self.evicted += 1
                return
        # Everything is in flight: the caller's own limit on concurrent checks
        # (max_pending_hashes) keeps that far below max_records.

    def prune(self, now: float) -> None:
        """Forget quiet records (the sweep calls this every second). Records are in
        order of their last failure, so this stops at the first that is not quiet:
        it costs what it removes, not what the throttle holds."""
        quiet = []
        for key, record in self._records.items():
            if record.pending:
                continue  # in flight (at most max_pending_hashes of them)
            if not self._stale(record, now):
                break
            quiet.append(key)
        for key in quiet:
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)


class SprayWatch:
    """Existing accounts that failed from many distinct sources recently: a spray
    across sources, which the throttle deliberately does not turn into a lockout.

    Only accounts that exist are watched (the caller says so), so its size is
    bounded by the user table times `sources`, not by what an attacker sends.
    """

    def __init__(self, sources: int, window: float) -> None:
        self.sources = sources
        self.window = window
        self._accounts: dict[str, OrderedDict[str, float]] = {}

    def failed(self, user: str, address: str, now: float) -> None:
        seen = self._accounts.setdefault(user, OrderedDict())
        source = source_of(address)[0]
        seen[source] = now
        seen.move_to_end(source)
        while len(seen) > self.sources:  # the newest `sources` are all it takes
            seen.popitem(last=False)

    def prune(self, now: float) -> None:
        for user in list(self._accounts):
            seen = self._accounts[user]
            while seen and now - next(iter(seen.values())) > self.window:
                seen.popitem(last=False)
            if not seen:
                del self._accounts[user]

    def targeted(self, now: float) -> int:
        """Accounts that failed from at least `sources` sources within the window."""
        self.prune(now)
        return sum(1 for seen in self._accounts.values() if len(seen) >= self.sources)

    def __len__(self) -> int:
        return len(self._accounts)
