"""Login latency: 1000 logins against a real pushgate-auth (TLS on 127.0.0.1).

Each login verifies an Argon2id hash (m=19 MiB, t=2, p=1), allocates an address,
mints keys and commits to SQLite; logins are sequential over one TLS channel.
Throttling is switched off for the bench user by succeeding every time.
"""

import statistics
import sys
import tempfile
import time

from netlab.auth import AuthServer

LOGINS = 1000


def main() -> int:
    with tempfile.TemporaryDirectory() as directory:
        server = AuthServer(f"{directory}/gw", network="198.19.0.0/20")
        server.add_user("bench", "bench password")
        server.start()
        try:
            stub_login = server.login
            stub_login("bench", "bench password")  # warm up the channel
            timings = []
            for _ in range(LOGINS):
                start = time.perf_counter()
                stub_login("bench", "bench password")
                timings.append(time.perf_counter() - start)
        finally:
            server.stop()
    timings.sort()
    p99 = timings[int(len(timings) * 0.99) - 1]
    print(
        f"login: {LOGINS} sequential logins over TLS, median "
        f"{statistics.median(timings) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {timings[-1] * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
