"""Logging what others can make happen often, without letting them flood the log.

Bad packets, failed logins and I/O errors come at the rate someone else chooses;
DESIGN.md (invariant 3) has every log line about bad input rate-limited. Shared by
the dataplane and the auth service.
"""

import logging
import time
from collections.abc import Callable

from push_protocol.drops import UsageError


class RateLimitedLog:
    """At most one warning per key per `interval`; the lines held back are counted
    and the count is told on the key's next line.

    Keys may come from the network (user names), so at most `max_keys` are
    remembered at once: past that, every other key shares one line per interval,
    which tells how many it held back. `prune` forgets keys quiet for an interval
    (with any count they held back); `clock` is time.monotonic unless a test steps it.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or max_keys < 1:
            raise UsageError(f"no rate-limited log with interval {interval}, max_keys {max_keys}")
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (when it last wrote, held back)
        self._others = (float("-inf"), 0)  # the same, for the keys beyond max_keys

    def warning(self, key: str, message: str, *args) -> bool:
        """Log `message % args` unless `key` wrote less than an interval ago; True if
        it was written."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is None and len(self._keys) >= self.max_keys:
            last, held = self._others
            if now - last < self.interval:
                self._others = (last, held + 1)
                return False
            self._others = (now, 0)
            self._write(message, args, held, "(and %d more lines held back for other keys)")
            return True
        last, held = entry or (float("-inf"), 0)
        if now - last < self.interval:
            self._keys[key] = (last, held + 1)
            return False
        self._keys[key] = (now, 0)
        self._write(message, args, held, "(%d similar held back)")
        return True

    def _write(self, message: str, args: tuple, held: int, held_note: str) -> None:
        if held:
            self.logger.warning(f"{message} {held_note}", *args, held)
        else:
            self.logger.warning(message, *args)

    def prune(self) -> None:
        """Forget the keys that wrote an interval ago or longer."""
        now = self._clock()
        for key in [k for k, (last, _) in self._keys.items() if now - last >= self.interval]:
            del self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)
