"""Auth service memory under failed logins with distinct user names and sources.

Drives what each failed login touches in pushgate-auth, with the default limits:
the throttle (`begin`, then `finish` as failed), the failure-log limiter and the
spray watch (here on an account that exists, to fill it too), plus the sweep's
pruning once a simulated second, and reports the process's RSS as failures
accumulate. Two clocks: the hash pool's pace (100 failures a second, above what
two Argon2id workers verify), where the sweep keeps everything small, and all at
once (1000 a second), where only the bound (max_throttle_records) holds memory.
The hashes themselves are left out: they bound the pace, not the memory.
"""

import logging
import resource
import sys

from auth_service.server import FAILURE_LOG_NAMES, FAILURE_LOG_SECONDS, log
from auth_service.throttle import Limits, Outcome, SprayWatch, Throttle, login_keys
from pushgate_io.rate_limited_log import RateLimitedLog

FAILURES = 100_000
DEFAULT_MAX_RECORDS = 100_000  # gateway_config's default for max_throttle_records


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run(per_second: int, rounds: int) -> list[tuple[int, float, int]]:
    throttle = Throttle(Limits(), 1.0, 300.0, DEFAULT_MAX_RECORDS)
    watch = SprayWatch(10, 900.0)
    n = 0
    failures = RateLimitedLog(
        log, FAILURE_LOG_SECONDS, FAILURE_LOG_NAMES, clock=lambda: n / per_second
    )
    figures = [(0, rss_mib(), 0)]
    for _ in range(rounds):
        for _ in range(FAILURES):
            now = n / per_second
            name = f"user-{n}"
            address = f"198.{18 + (n >> 16) % 2}.{(n >> 8) % 256}.{n % 256}"
            keys = login_keys(name, address)
            if throttle.begin(keys, now).go:
                throttle.finish(keys, now, Outcome.FAILED)
            watch.failed("alice", address, now)
            failures.warning(name, "login failed user=%r peer=%s", name, address)
            n += 1
            if n % per_second == 0:
                throttle.prune(now)
                failures.prune()
                watch.targeted(now)
        figures.append((n, rss_mib(), len(throttle)))
    return figures


def main() -> int:
    logging.disable(logging.WARNING)  # the failure lines themselves are not measured
    for per_second, label in ((100, "at the hash pool's pace"), (1000, "all at once")):
        figures = run(per_second, rounds=5)
        line = ", ".join(
            f"{n // 1000}k: {rss:.1f} MiB ({records} records)" for n, rss, records in figures
        )
        print(f"throttle memory, failures {label} ({per_second}/s): {line}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"throttle memory: peak RSS {peak:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
