"""Logins against real pushgate-auth processes (TLS on 127.0.0.1).

Each login verifies an Argon2id hash (m=19 MiB, t=2, p=1), allocates an address,
mints keys and commits. First the latency of sequential logins over one TLS
channel (SQLite); then logins per second with CONCURRENT callers for each store:
SQLite, PostgreSQL behind one auth service, and PostgreSQL behind two auth services
(the callers spread over both, as clients over two gateways). PostgreSQL is Debian's
server started in a temporary directory (netlab/postgres.py). Every auth service
and the database share this machine's cores, so two auth services cannot show more
than the cores allow: the figure says what the shared store costs, not how two
hosts would scale (docs/scaling.md computes that).
"""

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from netlab.auth import AuthServer
from netlab.postgres import Postgres

LOGINS = 1000
THROUGHPUT_LOGINS = 400
CONCURRENT = 16
USERS = 64  # logins cycle over them (each keeps at most 3 sessions: the oldest ends)
PASSWORD = "bench password"


def latency() -> str:
    with tempfile.TemporaryDirectory() as directory:
        server = AuthServer(f"{directory}/gw", network="198.19.0.0/20")
        server.add_user("bench", PASSWORD)
        server.start()
        try:
            server.login("bench", PASSWORD)  # warm up the channel
            timings = []
            for _ in range(LOGINS):
                start = time.perf_counter()
                server.login("bench", PASSWORD)
                timings.append(time.perf_counter() - start)
        finally:
            server.stop()
    timings.sort()
    p99 = timings[int(len(timings) * 0.99) - 1]
    return (
        f"login: {LOGINS} sequential logins over TLS (SQLite), median "
        f"{statistics.median(timings) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {timings[-1] * 1000:.1f} ms"
    )


def throughput(directory: str, database_url: str | None, services: int) -> float:
    servers = [
        AuthServer(f"{directory}/gw{n}", network="198.19.0.0/20", database_url=database_url)
        for n in range(services)
    ]
    for n in range(USERS):
        servers[0].add_user(f"user{n}", PASSWORD)
    for server in servers:
        server.start()
    try:
        stubs = [server.stub() for server in servers]
        for server in servers:
            server.login("user0", PASSWORD)  # warm up

        def login(n: int) -> None:
            from pushgate_api import auth_pb2

            stubs[n % services].Login(
                auth_pb2.LoginRequest(username=f"user{n % USERS}", password=PASSWORD),
                timeout=60,
            )

        with ThreadPoolExecutor(CONCURRENT) as pool:
            start = time.perf_counter()
            list(pool.map(login, range(THROUGHPUT_LOGINS)))
            elapsed = time.perf_counter() - start
    finally:
        for server in servers:
            server.stop()
    return THROUGHPUT_LOGINS / elapsed


def main() -> int:
    print(latency())
    rows = []
    with tempfile.TemporaryDirectory() as directory, Postgres() as postgres:
        rows.append(("SQLite, 1 auth service", throughput(f"{directory}/s", None, 1)))
        url = postgres.create_database("bench_one")
        rows.append(("PostgreSQL, 1 auth service", throughput(f"{directory}/p1", url, 1)))
        url = postgres.create_database("bench_two")
        rows.append(("PostgreSQL, 2 auth services", throughput(f"{directory}/p2", url, 2)))
    print(
        f"\nlogins per second, {THROUGHPUT_LOGINS} logins by {CONCURRENT} concurrent callers "
        "(Argon2id each)"
    )
    print("| store | logins/s | vs SQLite |\n| --- | --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
