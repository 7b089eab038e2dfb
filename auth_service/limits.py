"""Resource limits of the client API port, sized from the process' file-descriptor limit.

Pure: `plan` takes the limits it may use and returns the numbers; `server_options`
turns them into gRPC server options. cli.py raises RLIMIT_NOFILE and logs the plan.
"""

from dataclasses import dataclass

MAX_REQUEST_BYTES = 64 * 1024
# Descriptors kept for everything but client connections: SQLite (database, WAL and
# shared memory, for the service's and the self-check's connections), the session
# feed socket and its dataplanes, the metrics server's scrapes, epoll and event fds,
# stdio, and headroom for the kernel's accept backlog being drained.
FD_RESERVE = 128
UNLIMITED_FDS = 1 << 20  # what RLIM_INFINITY is taken as (Linux's default nr_open)
# pushgate-client makes one call at a time, but tools share a channel between threads,
# and the server counts a stream until it is fully closed: with 8, eight threads
# logging in and out on one channel saw 15 % of calls refused (UNAVAILABLE). 32
# leaves that margin and still bounds what one connection holds.
MAX_STREAMS_PER_CONNECTION = 32
# Calls in flight across all connections; a call beyond it gets RESOURCE_EXHAUSTED
# at once. Logins are further bounded by the hash pool (max_pending_hashes).
MAX_CONCURRENT_RPCS = 1000
MAX_HEALTH_WATCHERS = 16  # Health.Watch streams at once (monitoring, not clients)
HANDSHAKE_TIMEOUT_MS = 10_000  # TLS and HTTP/2 preface done within this, or closed
MAX_CONNECTION_IDLE_MS = 60_000  # no call for this long: GOAWAY (clients reconnect)
MAX_CONNECTION_AGE_MS = 600_000  # every connection is renewed after this ...
MAX_CONNECTION_AGE_GRACE_MS = 30_000  # ... its calls in flight get this long to finish
KEEPALIVE_TIME_MS = 60_000  # the server pings a connection quiet for this long ...
KEEPALIVE_TIMEOUT_MS = 20_000  # ... and closes it if the ping is not answered
MIN_CLIENT_PING_INTERVAL_MS = 30_000  # client pings more often are strikes ...
MAX_PING_STRIKES = 2  # ... and a connection with more strikes is closed (GOAWAY)


@dataclass(frozen=True)
class Limits:
    fd_limit: int  # RLIMIT_NOFILE soft limit to run with (the hard limit)
    connections: int  # client API connections accepted at once


def plan(soft: int, hard: int, max_connections: int) -> Limits:
    """Run with the soft fd limit raised to the hard one; connections fit below it."""
    fd_limit = UNLIMITED_FDS if hard < 0 else hard  # RLIM_INFINITY is -1
    fd_limit = max(fd_limit, soft if soft >= 0 else UNLIMITED_FDS)
    return Limits(fd_limit, max(1, min(max_connections, fd_limit - FD_RESERVE)))


def server_options(limits: Limits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_allowed_incoming_connections", limits.connections),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        # A second pushgate-auth on the same port must fail, not share it with us.
        ("grpc.so_reuseport", 0),
    ]
