"""Rate-limited logging for lines about bad input, which a flood could repeat
millions of times: at most one line per key per interval, and that line says
how many it stood for."""

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """At most one warning per key per `interval` seconds of `clock`; counts what
    it swallowed and says so in the next line it lets through."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            message += f" ({last[1]} similar suppressed)"
        self.logger.warning(message, *args)
        self._last[key] = (now, 0)
