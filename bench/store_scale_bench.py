"""What one login and one rekey cost the store as the number of live sessions grows,
on SQLite and on PostgreSQL (Debian's server in a temporary directory), without
Argon2 or gRPC: SessionManager.create and .rekey, as the auth service runs them
(one transaction each, the allocation lock, the change log, the catch-up that
publishes to the local feed). docs/scaling.md builds on these figures.
"""

import asyncio
import ipaddress
import os
import statistics
import sys
import tempfile
import time

from auth_service.sessions import AddressPool, SessionManager
from auth_service.store import Store, StoredSession
from netlab.postgres import Postgres
from pushgate_api import auth_pb2

NETWORK = ipaddress.ip_network("198.18.0.0/15")  # 131,070 host addresses
GATEWAY = ipaddress.ip_address("198.18.0.1")
SIZES = (1_000, 10_000, 100_000)
SAMPLES = 50
CIPHER = auth_pb2.CIPHER_SUITE_AES_256_GCM


def fill(store: Store, count: int, start: int) -> None:
    """`count` more live sessions, written straight into the store (as many logins
    would have left them)."""
    hosts = NETWORK.hosts()
    for _ in range(start + 1):  # the gateway's and those written before
        next(hosts)
    now = time.time()
    with store.transaction():
        for n in range(start, start + count):
            store.add_session(
                StoredSession.begun(
                    n + 1,
                    n.to_bytes(32, "big"),
                    f"user{n}",
                    str(next(hosts)),
                    CIPHER,
                    now,
                    now + 900,
                )
            )


async def measure(location: str) -> list[tuple[int, float, float]]:
    sessions = SessionManager(
        Store(location),
        AddressPool(NETWORK, GATEWAY, 0),
        keepalive_seconds=10,
        session_lifetime_seconds=86400,
    )
    rows, filled = [], 0
    for size in SIZES:
        fill(sessions.store, size - filled, filled)
        filled = size
        logins, rekeys = [], []
        for n in range(SAMPLES):
            start = time.perf_counter()
            created, _, _ = await sessions.create(f"bench{size}-{n}", CIPHER, time.time())
            logins.append(time.perf_counter() - start)
            start = time.perf_counter()
            await sessions.rekey(created, time.time())
            rekeys.append(time.perf_counter() - start)
            await sessions.remove(created, 1, time.time())
        rows.append((size, statistics.median(logins), statistics.median(rekeys)))
    sessions.store.close()
    return rows


def main() -> int:
    print("store cost per login and rekey by live sessions")
    print("| store | live sessions | login (store part) ms | rekey ms |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory, Postgres() as postgres:
        for name, location in (
            ("SQLite", os.path.join(directory, "bench.db")),
            ("PostgreSQL", postgres.create_database("scale")),
        ):
            for size, login, rekey in asyncio.run(measure(location)):
                print(f"| {name} | {size:,} | {login * 1000:.2f} | {rekey * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
