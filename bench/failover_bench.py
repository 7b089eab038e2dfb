"""Failover between two gateways on one PostgreSQL (netlab/cluster.py), in
namespaces: a client pings the lan host every 0.1 s through gateway gw-a; gw-a's
dataplane is killed (SIGKILL); the outage is the longest time without an echo
reply until the client runs through gw-b. Then gw-a's dataplane starts again and the
client moves back once a probe finds it (at most FAILBACK_PROBE_SECONDS later);
that move's longest silence is the second figure. Medians of RUNS runs for the
client's default dead-path time (two keepalives and 5 s) and for `--dead-after 3`.
"""

import os
import statistics
import sys
import tempfile

from netlab import Lab
from netlab.cluster import ClusterLab
from netlab.postgres import Postgres

RUNS = int(os.environ.get("FAILOVER_RUNS", "3"))
KEEPALIVE = 2


def failover(postgres: Postgres, run: int, dead_after: float | None) -> tuple[float, float]:
    """(outage after the kill, longest silence of the move back), seconds."""
    url = postgres.create_database(f"failover{run}")
    extra = ("--dead-after", str(dead_after)) if dead_after else ()
    with tempfile.TemporaryDirectory() as directory, Lab("pgfb") as lab:
        cluster = ClusterLab(lab, directory, url, keepalive_seconds=KEEPALIVE)
        cluster.add_user("alice")
        for name in ("gw-a", "gw-b"):
            cluster.start_gateway(name)
        cluster.connect("alice", "gw-a", *extra)
        outage, moving_back = cluster.fail_over_and_back(0.1, 60)
        if cluster.logins() != 1:
            raise SystemExit(f"run {run}: {cluster.logins()} logins, expected 1")
        return outage, moving_back


def main() -> int:
    print(
        f"failover: two gateways on one PostgreSQL, keepalive {KEEPALIVE} s, ping every 0.1 s,"
        f" medians of {RUNS} runs (no new login in any)"
    )
    print("| dead-path time | outage after kill -9 (min-max) | silence moving back |")
    print("| --- | --- | --- |")
    with Postgres() as postgres:
        run = 0
        for dead_after in (None, 3.0):
            outages, backs = [], []
            for _ in range(RUNS):
                run += 1
                outage, back = failover(postgres, run, dead_after)
                outages.append(outage)
                backs.append(back)
            label = (
                f"{dead_after:g} s (--dead-after)"
                if dead_after
                else f"{2 * KEEPALIVE + 5} s (default)"
            )
            print(
                f"| {label} | {statistics.median(outages):.2f} s"
                f" ({min(outages):.2f}-{max(outages):.2f}) | {statistics.median(backs):.2f} s |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
