"""Failed-login throttling per account and per source address (pure, `now` passed in).

The first `free_failures` failures of a key cost nothing; each further one
doubles a delay (from `base_delay` up to `max_delay`) during which attempts for
that key are refused without checking the password. A success clears the
account's record. Records forget themselves after `max_delay` of quiet, so a
real user can never be locked out for good: at worst they wait `max_delay`.
"""

from dataclasses import dataclass


@dataclass
class _Record:
    failures: int
    blocked_until: float
    last_failure: float


class Throttle:
    def __init__(self, free_failures: int, base_delay: float, max_delay: float) -> None:
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._records: dict[str, _Record] = {}

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 if it may try now."""
        record = self._records.get(key)
        if record is None:
            return 0.0
        if now - record.last_failure > self.max_delay and now >= record.blocked_until:
            del self._records[key]
            return 0.0
        return max(0.0, record.blocked_until - now)

    def failed(self, key: str, now: float) -> None:
        self.retry_after(key, now)  # forget a stale record first
        record = self._records.setdefault(key, _Record(0, 0.0, now))
        record.failures += 1
        record.last_failure = now
        excess = record.failures - self.free_failures
        if excess > 0:
            delay = min(self.max_delay, self.base_delay * 2 ** (excess - 1))
            record.blocked_until = now + delay

    def succeeded(self, key: str) -> None:
        self._records.pop(key, None)

    def __len__(self) -> int:
        return len(self._records)

    def prune(self, now: float) -> None:
        for key in list(self._records):
            self.retry_after(key, now)
