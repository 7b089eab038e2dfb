"""Dataplane counters (plain integers on the hot path) and their Prometheus export.

The receive loop bumps plain ints; the collector turns them into metrics when
/metrics is scraped. The scrape is served by its own thread (metrics_http.py),
so a slow or flooding scraper cannot hold up the loop, but what the loop mutates
is copied on the loop thread, between two callbacks (`on_loop`): every scrape
sees a consistent snapshot:

    datagrams_received == datagrams_delivered + sum(drops{direction="inbound"})
    tun_packets_read   == outbound_delivered  + sum(drops{direction="outbound"})

"Delivered" means handed to the kernel (TUN write or UDP send) or accepted into
a bounded output queue; a queued packet that later fails to be written is
counted in pushgate_dataplane_io_errors_total. A UDP send the kernel refuses
(ENOBUFS: the push socket has IP_RECVERR, so it is not dropped silently) is an
outbound `no_buffer_space` drop, each datagram of a refused GSO send included.
"""

import copy
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from push_protocol.ciphercache import DEFAULT_CIPHER_CACHE, CipherCache
from push_protocol.drops import DropReason
from push_protocol.lifecycle import SessionState

from .registry import Registry

INBOUND, OUTBOUND = "inbound", "outbound"


class BoundedQueue:
    """A FIFO with a capacity in packets that never blocks: `put` says if it fit."""

    __slots__ = ("_items", "capacity", "high_water", "name", "overflows")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._items: deque = deque()
        self.high_water = 0
        self.overflows = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item) -> bool:
        if len(self._items) >= self.capacity:
            self.overflows += 1
            return False
        self._items.append(item)
        if len(self._items) > self.high_water:
            self.high_water = len(self._items)
        return True

    def peek(self):
        return self._items[0]

    def pop(self) -> None:
        self._items.popleft()


@dataclass
class Counters:
    datagrams_received: int = 0
    datagrams_delivered: int = 0
    tun_packets_read: int = 0
    outbound_delivered: int = 0
    rx_packets: int = 0  # authenticated inner packets from clients
    rx_bytes: int = 0
    tx_packets: int = 0  # sealed packets sent to clients
    tx_bytes: int = 0
    inbound_drops: dict[DropReason, int] = field(
        default_factory=lambda: dict.fromkeys(DropReason, 0)
    )
    outbound_drops: dict[DropReason, int] = field(
        default_factory=lambda: dict.fromkeys(DropReason, 0)
    )
    io_errors: dict[str, int] = field(
        default_factory=lambda: {"udp_recv": 0, "udp_send": 0, "tun_read": 0, "tun_write": 0}
    )
    # reports read off the push socket's error queue (IP_RECVERR), by errno name
    udp_error_reports: dict[str, int] = field(default_factory=dict)
    icmp_too_big_sent: int = 0
    rekey_requests_sent: int = 0
    keys_refused: int = 0
    policy_compiles: int = 0  # distinct access policies compiled (sessions share them)
    policies_refused: int = 0  # access policies from the feed that cannot be enforced
    mss_clamped: int = 0
    session_installs: int = 0
    session_removals: int = 0
    session_rekeys: int = 0
    session_expiries: int = 0
    control_connected: int = 0
    control_resyncs: int = 0
    feed_revision: int = 0  # the session feed revision applied last (drift alert)
    # connections refused by the peer check (control_socket): stats clients, feed servers
    control_peers_refused: dict[str, int] = field(default_factory=lambda: {"stats": 0, "feed": 0})
    stalled_sessions: int = 0

    def snapshot(self) -> "Counters":
        """A copy the loop no longer changes (its dicts copied too)."""
        snapshot = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, dict):
                setattr(snapshot, name, dict(value))
        return snapshot


class KernelDrops:
    """What the kernel dropped on its side of our two file descriptors, read at scrape
    time (never on the hot path): datagrams for the push socket that did not fit its
    receive buffer, and packets for the dataplane that did not fit the TUN's queue
    (both mean the dataplane read slower than traffic arrived). Missing files (another
    network namespace, an older kernel) read as nothing rather than failing a scrape."""

    def __init__(
        self,
        sock: socket.socket,
        tun_name: str,
        proc: str = "/proc",
        filter_drops: Callable[[], dict[DropReason, int]] | None = None,
    ) -> None:
        self._inode = os.fstat(sock.fileno()).st_ino
        self._udp_tables = [f"{proc}/net/udp", f"{proc}/net/udp6"]
        self._tun_dropped = f"/sys/class/net/{tun_name}/statistics/tx_dropped"
        # The socket's drop count includes what its eBPF filter dropped (counted by
        # reason elsewhere); those are taken out, read second so the difference can
        # only lag, and never shown lower than before (a counter never goes down).
        self._filter_drops = filter_drops
        self._udp_reported = 0

    def __call__(self) -> dict[str, int]:
        udp = self._udp_drops()
        if self._filter_drops is not None:
            udp -= sum(self._filter_drops().values())
        self._udp_reported = max(self._udp_reported, udp)
        return {"udp_receive_buffer": self._udp_reported, "tun_queue": self._tun_drops()}

    def _udp_drops(self) -> int:
        inode = str(self._inode)
        for path in self._udp_tables:
            try:
                with open(path) as table:
                    for line in table:
                        fields = line.split()
                        if len(fields) > 12 and fields[9] == inode:
                            return int(fields[-1])  # the last column: drops
            except OSError:
                continue
        return 0

    def _tun_drops(self) -> int:
        try:
            with open(self._tun_dropped) as handle:
                return int(handle.read())
        except (OSError, ValueError):
            return 0


def snmp_section(text: str, section: str) -> dict[str, int]:
    """One section ("Udp", "Icmp", ...) of /proc/net/snmp: a line of names, then values."""
    names, values = (
        line.split()[1:] for line in text.splitlines() if line.startswith(section + ":")
    )
    return dict(zip(names, map(int, values), strict=True))


class KernelSendErrors:
    """The kernel's UDP SndbufErrors for the dataplane's network namespace (IPv4 from
    /proc/net/snmp, IPv6 from /proc/net/snmp6), read at scrape time: send calls the
    kernel refused, ENOBUFS (no room in a transmit queue) or EAGAIN (the socket's
    send buffer full), from any UDP socket in the namespace; the kernel keeps no
    such count per socket. Missing files read as nothing rather than failing a scrape."""

    def __init__(self, proc: str = "/proc") -> None:
        self._snmp, self._snmp6 = f"{proc}/net/snmp", f"{proc}/net/snmp6"

    def __call__(self) -> int:
        total = 0
        try:
            with open(self._snmp) as handle:
                total += snmp_section(handle.read(), "Udp").get("SndbufErrors", 0)
        except (OSError, ValueError):
            pass
        try:
            with open(self._snmp6) as handle:
                for line in handle:
                    fields = line.split()
                    if len(fields) == 2 and fields[0] == "Udp6SndbufErrors":
                        total += int(fields[1])
        except (OSError, ValueError):
            pass
        return total


class UserTotals:
    """Traffic and drops by user name, for the opt-in `user_*` families: one series per
    account however many sessions it has had, so their number is bounded by the
    accounts, never by sessions or sources. Counted from the live sessions' own
    counters at each scrape, plus what sessions that have ended since had counted at
    the last scrape they were seen (so a total never goes down; what a session
    passed between that scrape and its end is not counted)."""

    def __init__(self) -> None:
        self._ended: dict[str, list[int]] = {}  # user -> [inbound, outbound bytes, drops]
        self._seen: dict[int, tuple[str, int, int, int]] = {}  # session id -> last values

    def _add(self, totals: dict[str, list[int]], user: str, values) -> None:
        total = totals.setdefault(user, [0, 0, 0])
        for index, value in enumerate(values):
            total[index] += value

    def update(self, records) -> dict[str, list[int]]:
        """Per user: [inbound bytes, outbound bytes, drops]. Runs on the loop's thread."""
        seen = {}
        for record in records:
            tunnel = record.tunnel
            values = (tunnel.rx_bytes, tunnel.tx_bytes, sum(record.drops.values()))
            before = self._seen.get(record.session_id)
            if before is not None and any(a < b for a, b in zip(values, before[1:], strict=True)):
                self._add(self._ended, before[0], before[1:])  # its counters started over
            seen[record.session_id] = (record.username, *values)
        for session_id, (user, *values) in self._seen.items():
            if session_id not in seen:
                self._add(self._ended, user, values)
        self._seen = seen
        totals = {user: list(values) for user, values in self._ended.items()}
        for user, *values in seen.values():
            self._add(totals, user, values)
        return totals


class DataplaneCollector:
    def __init__(
        self,
        counters: Counters,
        registry: Registry,
        queues: list[BoundedQueue],
        cipher_cache: CipherCache = DEFAULT_CIPHER_CACHE,
        kernel_drops: Callable[[], dict[str, int]] | None = None,
        filter_drops: Callable[[], dict[DropReason, int]] | None = None,
        on_loop: Callable[[Callable], object] | None = None,
        kernel_send_errors: Callable[[], int] | None = None,
        user_metrics: bool = False,
        tun_queues: int = 1,
    ):
        self._c = counters
        self._tun_queues = tun_queues
        self._users = UserTotals() if user_metrics else None
        # runs a function on the loop's thread and returns its result (None: here)
        self._on_loop = on_loop or (lambda function: function())
        self._registry = registry
        self._queues = queues
        self._cipher_cache = cipher_cache
        self._kernel_drops = kernel_drops
        # the kernel socket filter's drops (dataplane/socket_filter.py): datagrams that
        # reached the push port and were dropped there, so counted as received too
        self._filter_drops = filter_drops
        self._kernel_send_errors = kernel_send_errors

    def _loop_state(self):
        """What the loop mutates, copied on its thread: counters, sessions, queues."""
        queues = [(q.name, q.capacity, len(q), q.high_water, q.overflows) for q in self._queues]
        users = self._users.update(self._registry.by_id.values()) if self._users else None
        return self._c.snapshot(), self._registry.count_by_state(), queues, users

    def collect(self):
        c, counts, queues, users = self._on_loop(self._loop_state)
        prefix = "pushgate_dataplane_"

        def counter(name, doc, value):
            family = CounterMetricFamily(prefix + name, doc)
            family.add_metric([], value)
            return family

        def gauge(name, doc, value):
            family = GaugeMetricFamily(prefix + name, doc)
            family.add_metric([], value)
            return family

        def counters_by(label, name, doc, values):
            """One counter family, a sample per (label value, count) of `values`."""
            family = CounterMetricFamily(prefix + name, doc, labels=[label])
            for key, value in values:
                family.add_metric([key], value)
            return family

        filtered = self._filter_drops() if self._filter_drops is not None else {}
        yield counter(
            "datagrams_received",
            "UDP datagrams received on the push port (with those the kernel filter dropped)",
            c.datagrams_received + sum(filtered.values()),
        )
        yield counter(
            "datagrams_delivered",
            "Received datagrams that reached their destination (TUN, a session, "
            "or an accepted keepalive)",
            c.datagrams_delivered,
        )
        yield counter("tun_packets_read", "Packets read from the server TUN", c.tun_packets_read)
        yield counter(
            "outbound_delivered", "TUN packets sealed and sent to a session", c.outbound_delivered
        )
        drops = CounterMetricFamily(
            prefix + "drops",
            "Dropped packets by direction and reason",
            labels=["direction", "reason"],
        )
        for reason, value in c.inbound_drops.items():
            drops.add_metric([INBOUND, reason.value], value + filtered.get(reason, 0))
        for reason, value in c.outbound_drops.items():
            drops.add_metric([OUTBOUND, reason.value], value)
        yield drops
        yield gauge(
            "kernel_filter",
            "1 if the push socket's eBPF filter drops malformed datagrams in the kernel",
            int(self._filter_drops is not None),
        )
        yield gauge(
            "tun_queues",
            "Queues of the server TUN, a client's packets in the one its address picks "
            "(1: every client's in one kernel FIFO)",
            self._tun_queues,
        )
        if filtered:
            yield counters_by(
                "reason",
                "kernel_filter_drops",
                "Inbound drops made by the eBPF socket filter, by reason "
                "(already included in drops_total)",
                ((reason.value, value) for reason, value in filtered.items()),
            )
        if self._kernel_drops is not None:
            yield counters_by(
                "where",
                "kernel_drops",
                "Packets the kernel dropped before the dataplane could read them: "
                "push datagrams over the socket's receive buffer, packets over the TUN's queue",
                self._kernel_drops().items(),
            )
        if self._kernel_send_errors is not None:
            yield counter(
                "kernel_udp_sndbuf_errors",
                "The kernel's UDP SndbufErrors in the dataplane's network namespace: send "
                "calls refused (ENOBUFS or EAGAIN) by any UDP socket there; the dataplane's "
                "own are no_buffer_space drops (ENOBUFS) or queued (EAGAIN)",
                self._kernel_send_errors(),
            )
        # One direction vocabulary for every family: inbound is from clients (into the
        # gateway's networks), outbound is to clients, as in drops_total.
        packets = CounterMetricFamily(
            prefix + "packets",
            "Tunnel packets by direction: inbound authenticated from clients, outbound "
            "sealed and sent to clients",
            labels=["direction"],
        )
        packets.add_metric([INBOUND], c.rx_packets)
        packets.add_metric([OUTBOUND], c.tx_packets)
        yield packets
        volume = CounterMetricFamily(
            prefix + "bytes",
            "Inner packet bytes by direction (inbound from clients, outbound to clients)",
            labels=["direction"],
        )
        volume.add_metric([INBOUND], c.rx_bytes)
        volume.add_metric([OUTBOUND], c.tx_bytes)
        yield volume
        yield counters_by("kind", "io_errors", "Socket and TUN errors by kind", c.io_errors.items())
        yield counters_by(
            "error",
            "udp_error_reports",
            "Error reports read off the push socket's error queue, by errno name: ICMP "
            "errors about datagrams sent to clients (ECONNREFUSED: nothing listens there)",
            c.udp_error_reports.items(),
        )
        yield counter(
            "icmp_too_big_sent",
            "ICMP fragmentation-needed / packet-too-big sent",
            c.icmp_too_big_sent,
        )
        yield counter(
            "rekey_requests_sent",
            "REKEY_REQUIRED sent to clients whose keys were re-learned after a restart",
            c.rekey_requests_sent,
        )
        yield counter(
            "keys_refused",
            "Session keys from the auth service not installed (created in the future)",
            c.keys_refused,
        )
        yield counter(
            "policy_compiles",
            "Access policies compiled (one per distinct policy; sessions share them)",
            c.policy_compiles,
        )
        yield counter(
            "policies_refused",
            "Access policies from the auth service that cannot be enforced (the session"
            " reaches nothing)",
            c.policies_refused,
        )
        yield counter("mss_clamped", "TCP SYNs whose MSS was lowered", c.mss_clamped)
        yield counter("session_installs", "Sessions installed", c.session_installs)
        yield counter("session_removals", "Sessions removed", c.session_removals)
        yield counter("session_rekeys", "Key rotations installed", c.session_rekeys)
        yield counter("session_expiries", "Sessions expired by the dataplane", c.session_expiries)
        yield counter("control_resyncs", "Full re-lists of the session feed", c.control_resyncs)
        yield gauge(
            "control_connected", "1 while the session feed is being watched", c.control_connected
        )
        yield gauge(
            "feed_revision",
            "Session feed revision applied (beside pushgate_auth_feed_revision: drift)",
            c.feed_revision,
        )
        yield counters_by(
            "socket",
            "control_peers_refused",
            "Local connections refused because the peer's uid is not allowed: clients of "
            "the stats socket, or a session feed served by another user",
            c.control_peers_refused.items(),
        )
        yield gauge(
            "stalled_sessions",
            "Sessions receiving but not sending, or the reverse, "
            "for longer than their keepalive interval",
            c.stalled_sessions,
        )
        sessions = GaugeMetricFamily(prefix + "sessions", "Sessions by state", labels=["state"])
        for state in SessionState:
            sessions.add_metric([state.value], counts[state])
        yield sessions
        for name, doc, column in (
            ("queue_capacity", "Queue capacity in packets", 1),
            ("queue_depth", "Packets waiting in the queue", 2),
            ("queue_high_water", "Highest queue depth seen", 3),
        ):
            family = GaugeMetricFamily(prefix + name, doc, labels=["queue"])
            for queue in queues:
                family.add_metric([queue[0]], queue[column])
            yield family
        overflows = CounterMetricFamily(
            prefix + "queue_overflows", "Packets refused by a full queue", labels=["queue"]
        )
        for queue in queues:
            overflows.add_metric([queue[0]], queue[4])
        yield overflows
        if users is not None:  # [dataplane] user_metrics = true
            volume = CounterMetricFamily(
                prefix + "user_bytes",
                "Inner bytes by user name and direction (opt-in: [dataplane] user_metrics)",
                labels=["user", "direction"],
            )
            drops = CounterMetricFamily(
                prefix + "user_drops",
                "Packets of a user's sessions dropped, any reason (opt-in: user_metrics)",
                labels=["user"],
            )
            for user, (inbound, outbound, dropped) in sorted(users.items()):
                volume.add_metric([user, INBOUND], inbound)
                volume.add_metric([user, OUTBOUND], outbound)
                drops.add_metric([user], dropped)
            yield volume
            yield drops
        cache = self._cipher_cache  # plain ints and a len(): atomic reads, in no equation
        yield gauge(
            "cipher_contexts",
            "Keypairs holding built AEAD contexts (bounded by the cipher cache)",
            len(cache),
        )
        yield gauge(
            "cipher_contexts_capacity", "Most keypairs that hold built contexts", cache.capacity
        )
        yield counter("cipher_context_builds", "Keypairs whose contexts were built", cache.builds)
        yield counter(
            "cipher_context_evictions",
            "Built contexts dropped to make room (rebuilt on the keypair's next packet)",
            cache.evictions,
        )


def loop_lag_histogram(prometheus: CollectorRegistry) -> Histogram:
    return Histogram(
        "pushgate_dataplane_loop_lag_seconds",
        "How late the receive loop ran a timer scheduled every 100 ms",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        registry=prometheus,
    )


def register_collectors(
    prometheus: CollectorRegistry,
    counters: Counters,
    registry: Registry,
    queues: list[BoundedQueue],
    kernel_drops: Callable[[], dict[str, int]] | None = None,
    filter_drops: Callable[[], dict[DropReason, int]] | None = None,
    on_loop: Callable[[Callable], object] | None = None,
    kernel_send_errors: Callable[[], int] | None = None,
    user_metrics: bool = False,
    tun_queues: int = 1,
) -> None:
    """Our counters, the kernel's drops next to them, and the process' CPU, memory and
    file descriptors."""
    prometheus.register(
        DataplaneCollector(
            counters,
            registry,
            queues,
            kernel_drops=kernel_drops,
            filter_drops=filter_drops,
            on_loop=on_loop,
            kernel_send_errors=kernel_send_errors,
            user_metrics=user_metrics,
            tun_queues=tun_queues,
        )
    )
    ProcessCollector(registry=prometheus)
