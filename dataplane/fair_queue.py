"""The dataplane's two queues: one FIFO per flow, served by deficit round robin, with CoDel.

Why: the push socket is one FIFO shared by every client. When the dataplane's
CPU is the bottleneck, whoever sends fastest fills it and the kernel drops
every client's datagrams alike, so one client's UDP flood starves another's
TCP (bench/fairness_bench.py). The receive loop therefore reads more than it
serves (Device.on_udp_readable) and what waits, waits here instead: each flow
in its own bounded FIFO, the flows served in turn a quantum of datagrams each
(deficit round robin, Shreedhar and Varghese; as in fq_codel, RFC 8290, a flow
that just got work goes before those that keep the queue busy, so a ping or a
DNS answer does not wait a round), and CoDel (RFC 8289) dropping
from the head of a flow whose datagrams have waited longer than `target` for
a whole `interval`, so that a TCP flow backs off while its queue is short.

The send direction has the same shape: the TUN is one kernel FIFO for every
client, so the send loop (Device.on_tun_readable) reads more than it seals and
the excess waits in a second FairQueue, one flow per session, its items the
packets read (no headers).

The quantum is counted in datagrams, not bytes: what the dataplane runs out of
is CPU, and a datagram costs about the same whatever its size (docs/performance.md:
opening 64 bytes 2.2 us, 1400 bytes 2.8 us).

A flow is a key the caller chooses (the dataplane: the session, for datagrams
from its endpoint; the source address, for any other). CoDel decides once per
turn of a flow, for the datagram at its head: the datagrams of one turn came
in a few receive calls, so they have waited alike.

Pure, in the style of push_protocol: no sockets and no clock, the caller passes
`now` (monotonic seconds). Every datagram pushed is either popped or reported
dropped with its reason, exactly once (tests/test_fair_queue.py).
"""

from collections import deque
from math import sqrt

from push_protocol.drops import DropReason, UsageError

QUANTUM = 32  # datagrams a flow is served per turn
FLOW_LIMIT = 4096  # datagrams one flow may hold
TOTAL_LIMIT = 16384  # datagrams all flows together may hold (about 24 MiB of 1.4 KB)
# CoDel's defaults (RFC 8289): `interval` is about the round-trip time of the
# flows it controls, `target` 5-10 % of it. docs/performance.md explains why they
# suit clients across the internet and what a LAN-only deployment could use.
TARGET = 0.005
INTERVAL = 0.100


class Flow:
    """One flow's FIFO of batches [arrival, session_id, source, datagrams, headers],
    its DRR deficit, and its CoDel state."""

    __slots__ = (
        "batches",
        "count",
        "deficit",
        "drop_next",
        "dropping",
        "first_above",
        "last_count",
        "length",
        "listed",
        "new",
    )

    def __init__(self) -> None:
        self.batches: deque[list] = deque()
        self.length = 0  # datagrams held
        self.deficit = 0
        self.first_above: float | None = None  # when the head's wait may first justify a drop
        self.drop_next = 0.0
        self.count = 0  # drops in this dropping state (RFC 8289 `count`)
        self.last_count = 0
        self.dropping = False
        self.listed = False  # in the round (one of the two lists)
        self.new = False  # in the new flows' list, not the old flows'


class FairQueue:
    """Per-flow FIFOs under one bound, served fairly; see the module docstring.

    `push` and `pop` append what they drop to the caller's list as
    (session_id, reason, count): `queue_full` for datagrams over a bound (those
    that come for a flow at its own bound; the oldest of the longest flow when
    all together are over theirs), `queue_delay` for CoDel's."""

    def __init__(
        self,
        name: str = "receive",
        *,
        quantum: int = QUANTUM,
        flow_limit: int = FLOW_LIMIT,
        total_limit: int = TOTAL_LIMIT,
        target: float = TARGET,
        interval: float = INTERVAL,
    ) -> None:
        if quantum < 1 or flow_limit < 1 or total_limit < 1 or not 0 < target < interval:
            raise UsageError("quantum and limits must be >= 1, and 0 < target < interval")
        self.name = name
        self.quantum = quantum
        self.flow_limit = flow_limit
        self.capacity = total_limit
        self.target = target
        self.interval = interval
        self._flows: dict[object, Flow] = {}
        # keys of the flows in the round: those that just got work first (RFC 8290's
        # new flows: a sparse flow, a ping, is served at once), then the others
        self._new: deque = deque()
        self._old: deque = deque()
        self._length = 0
        self.high_water = 0
        self.overflows = 0  # datagrams dropped for a bound (metrics: queue_overflows_total)

    def __len__(self) -> int:
        return self._length

    @property
    def flows(self) -> int:
        """Flows holding datagrams now."""
        return sum(1 for key in (*self._new, *self._old) if self._flows[key].length)

    def push(self, key, session_id: int, source, datagrams: list, headers, now, dropped):
        """Queue datagrams that arrived together on `key`'s flow, with their read
        headers (a list as long, or None: the send queue's packets have none)."""
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = Flow()
        if not flow.listed:
            self._new.append(key)  # work for a flow out of the round: served first
            flow.listed = flow.new = True
            flow.deficit = self.quantum
        room = self.flow_limit - flow.length
        if len(datagrams) > room:  # a flow at its bound takes no more (tail drop)
            excess = len(datagrams) - room
            dropped.append((session_id, DropReason.QUEUE_FULL, excess))
            self.overflows += excess
            if room <= 0:
                return
            datagrams = datagrams[:room]
            headers = headers[:room] if headers is not None else None
        flow.batches.append([now, session_id, source, datagrams, headers])
        flow.length += len(datagrams)
        self._length += len(datagrams)
        while self._length > self.capacity:
            longest = max((*self._new, *self._old), key=lambda k: self._flows[k].length)
            flow = self._flows[longest]
            self._overflow(longest, flow, min(flow.length, self._length - self.capacity), dropped)
        if self._length > self.high_water:
            self.high_water = self._length

    def refuses(self, key, count: int) -> bool:
        """Whether `key`'s flow is at its bound, so that `count` datagrams for it
        would all be dropped: then they are counted as refused (the caller counts
        them as `queue_full`) and need not be cut apart or read."""
        flow = self._flows.get(key)
        if flow is None or flow.length < self.flow_limit:
            return False
        self.overflows += count
        return True

    def pop(self, budget: int, now: float, dropped: list) -> list[tuple]:
        """About `budget` datagrams (whole batches: the last may go over), in turns
        of flows: runs of (session_id, source, datagrams, headers), one a batch.

        As in fq_codel, a flow is served while its deficit is positive and a
        batch costs its datagrams, so the deficit may go below zero; the debt is
        paid in its next turn. Batches stay whole: the receive loop opens a GRO
        batch in one call (TunnelSession.open_many)."""
        served: list[tuple] = []
        new, old, flows = self._new, self._old, self._flows
        while budget > 0 and (new or old):
            listed = new if new else old
            key = listed[0]
            flow = flows[key]
            if flow.deficit <= 0:  # its turn is over: credit for the next, to the back
                flow.deficit += self.quantum
                listed.popleft()
                old.append(key)
                flow.new = False
                continue
            if not flow.length:  # emptied in its turn
                listed.popleft()
                if flow.new and old:  # RFC 8290: once round the old ones before it leaves
                    old.append(key)
                    flow.new = False
                else:
                    self._retire(key, flow, now)
                continue
            self._codel(flow, now, dropped)
            if flow.length:
                batch = flow.batches.popleft()
                count = len(batch[3])
                served.append((batch[1], batch[2], batch[3], batch[4]))
                flow.length -= count
                self._length -= count
                flow.deficit -= count
                budget -= count
        return served

    def forget_idle(self, now: float) -> None:
        """Drop the CoDel state of flows that hold nothing and have not dropped
        for 16 intervals (RFC 8289 remembers `count` that long); called now and
        then, so that idle flows cost no memory."""
        stale = [
            key
            for key, flow in self._flows.items()
            if not flow.listed and now - flow.drop_next >= 16 * self.interval
        ]
        for key in stale:
            del self._flows[key]

    # -- inside -------------------------------------------------------------------

    def _drop_head(self, flow: Flow, count: int, reason: DropReason, dropped: list) -> None:
        batches = flow.batches
        left = count
        while left:
            batch = batches[0]
            datagrams = batch[3]
            if len(datagrams) <= left:
                batches.popleft()
                dropped.append((batch[1], reason, len(datagrams)))
                left -= len(datagrams)
            else:
                dropped.append((batch[1], reason, left))
                batch[3] = datagrams[left:]
                if batch[4] is not None:
                    batch[4] = batch[4][left:]
                left = 0
        flow.length -= count
        self._length -= count

    def _overflow(self, key, flow: Flow, count: int, dropped: list) -> None:
        self._drop_head(flow, count, DropReason.QUEUE_FULL, dropped)
        self.overflows += count

    def _retire(self, key, flow: Flow, now: float) -> None:
        """`flow`, empty, has left the round: out of memory too, unless CoDel still
        needs to remember it."""
        flow.deficit = 0
        flow.listed = flow.new = False
        flow.dropping = False  # an empty queue is below target (RFC 8289)
        flow.first_above = None
        if now - flow.drop_next >= 16 * self.interval:
            del self._flows[key]

    def _ok_to_drop(self, flow: Flow, now: float) -> bool:
        if flow.length <= 1 or now - flow.batches[0][0] < self.target:
            flow.first_above = None
            return False
        if flow.first_above is None:
            flow.first_above = now + self.interval
            return False
        return now >= flow.first_above

    def _codel(self, flow: Flow, now: float, dropped: list) -> None:
        """RFC 8289's dequeue for the head of `flow`: drop from it while CoDel says so."""
        ok = self._ok_to_drop(flow, now)
        if flow.dropping:
            if not ok:
                flow.dropping = False
                return
            while now >= flow.drop_next and flow.dropping:
                self._drop_head(flow, 1, DropReason.QUEUE_DELAY, dropped)
                flow.count += 1
                if self._ok_to_drop(flow, now):
                    flow.drop_next += self.interval / sqrt(flow.count)
                else:
                    flow.dropping = False
        elif ok:
            self._drop_head(flow, 1, DropReason.QUEUE_DELAY, dropped)
            self._ok_to_drop(flow, now)  # as RFC 8289: the new head updates first_above
            flow.dropping = True
            # drop faster at once if it was dropping not long ago
            delta = flow.count - flow.last_count
            recent = delta > 1 and now - flow.drop_next < 16 * self.interval
            flow.count = delta if recent else 1
            flow.drop_next = now + self.interval / sqrt(flow.count)
            flow.last_count = flow.count
