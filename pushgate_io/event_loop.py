"""Which asyncio event loop the dataplane and the Linux client run on.

PUSHGATE_EVENT_LOOP=uvloop runs them on uvloop (libuv) when it is installed, for
`bench/idle_latency_bench.py` to compare side by side; unset or "asyncio": the
standard library's loop. docs/performance.md says what was measured and why the
default is what it is.
"""

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger("pushgate")

EVENT_LOOP_ENVIRONMENT = "PUSHGATE_EVENT_LOOP"


def loop_factory(default=None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for asyncio.Runner: uvloop's if asked for (and present),
    else `default` (None: asyncio's own)."""
    wanted = os.environ.get(EVENT_LOOP_ENVIRONMENT, "asyncio")
    if wanted == "asyncio":
        return default
    if wanted != "uvloop":
        raise SystemExit(f"{EVENT_LOOP_ENVIRONMENT}={wanted!r}: expected asyncio or uvloop")
    try:
        import uvloop
    except ImportError:
        raise SystemExit(f"{EVENT_LOOP_ENVIRONMENT}=uvloop: uvloop is not installed") from None
    return uvloop.new_event_loop
