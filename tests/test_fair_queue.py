"""The receive queue (dataplane/fair_queue.py): nothing lost or repeated, per-flow
order, bounds, deficit round robin's fairness, and CoDel's drops."""

import itertools
from math import sqrt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.fair_queue import FairQueue
from push_protocol.drops import DropReason, UsageError

SOURCE = ("198.18.1.2", 4000)


def batch(flow: int, first: int, count: int) -> tuple[list, list]:
    """Datagrams named (flow, serial), and stand-in headers that name them too."""
    datagrams = [(flow, serial) for serial in range(first, first + count)]
    return datagrams, [("header", d) for d in datagrams]


def served_datagrams(runs: list[tuple]) -> list:
    out = []
    for session_id, source, datagrams, headers in runs:
        assert source == SOURCE
        assert headers == [("header", d) for d in datagrams]  # headers travel with their datagrams
        assert all(d[0] == session_id for d in datagrams)
        out += datagrams
    return out


operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 3), st.integers(1, 70)),
        st.tuples(st.just("pop"), st.integers(1, 100), st.just(0)),
        st.tuples(st.just("wait"), st.sampled_from([0.0005, 0.004, 0.02, 0.15, 3.0]), st.just(0)),
        st.tuples(st.just("forget"), st.just(0), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 40), st.integers(1, 200), st.integers(1, 400))
def test_every_datagram_is_served_or_dropped_once_in_order_within_bounds(
    ops, quantum, flow_limit, total_limit
):
    queue = FairQueue(quantum=quantum, flow_limit=flow_limit, total_limit=total_limit)
    now, next_serial = 1000.0, [0, 0, 0, 0]
    pushed, served, dropped = [], [], []
    for op, a, b in ops:
        if op == "push":
            datagrams, headers = batch(a, next_serial[a], b)
            next_serial[a] += b
            pushed += datagrams
            queue.push(a, a, SOURCE, datagrams, headers, now, dropped)
        elif op == "pop":
            runs = queue.pop(a, now, dropped)
            got = served_datagrams(runs)
            assert len(got) < a + 70  # whole batches: the last may go over
            served += got
        elif op == "wait":
            now += a
        else:
            queue.forget_idle(now)
        assert len(queue) <= total_limit
        assert all(f.length <= flow_limit for f in queue._flows.values())
        assert len(queue) == sum(f.length for f in queue._flows.values())
        assert queue.high_water <= total_limit
    while len(queue):
        served += served_datagrams(queue.pop(50, now, dropped))
    lost = [(session, reason, count) for session, reason, count in dropped]
    assert all(count > 0 for _, _, count in lost)
    assert {reason for _, reason, _ in lost} <= {DropReason.QUEUE_FULL, DropReason.QUEUE_DELAY}
    # nothing served twice, and what was neither served nor dropped does not exist
    assert len(served) == len(set(served))
    assert len(served) + sum(count for _, _, count in lost) == len(pushed)
    for flow in range(4):  # each flow's datagrams come out in the order they went in
        mine = [serial for f, serial in served if f == flow]
        assert mine == sorted(mine)
        dropped_here = sum(c for s, _, c in lost if s == flow)
        assert len(mine) + dropped_here == next_serial[flow]
    overflowed = sum(c for _, reason, c in lost if reason is DropReason.QUEUE_FULL)
    assert queue.overflows == overflowed


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(1, 200), min_size=1, max_size=40))
def test_backlogged_flows_get_equal_service_whatever_the_budgets(quantum, budgets):
    """Two flows that never run dry, one pushing batches 10x the other's: after any
    sequence of pops, their served counts differ by at most a quantum and a batch."""
    queue = FairQueue(quantum=quantum, flow_limit=10**6, total_limit=10**7, target=1, interval=2)
    dropped = []
    serials = [0, 0]
    served = [0, 0]

    def top_up():
        for flow, size in ((0, 60), (1, 6)):
            while queue._flows.get(flow) is None or queue._flows[flow].length < 2000:
                queue.push(flow, flow, SOURCE, *batch(flow, serials[flow], size), 0.0, dropped)
                serials[flow] += size

    for budget in budgets:
        top_up()
        for session_id, _, datagrams, _ in queue.pop(budget, 0.0, dropped):
            served[session_id] += len(datagrams)
        assert abs(served[0] - served[1]) <= quantum + 60
    assert dropped == []


def test_a_light_flow_is_served_before_a_flood():
    """A flow with new work (a ping) goes first (RFC 8290's new flows)."""
    queue = FairQueue(quantum=32)
    dropped = []
    for first in range(0, 4000, 10):
        queue.push(0, 0, SOURCE, *batch(0, first, 10), 0.0, dropped)
    # the flood's first quantum is spent and it is in its second turn, 14 left
    assert sum(len(d) for _, _, d, _ in queue.pop(50, 0.0, dropped)) == 50
    queue.push(1, 1, SOURCE, *batch(1, 0, 1), 0.0, dropped)  # a ping
    runs = queue.pop(64, 0.0, dropped)
    sessions = [session for session, *_ in runs]
    assert 1 in sessions
    before_ping = sum(len(d) for s, _, d, _ in runs[: sessions.index(1)])
    assert before_ping == 0


def test_the_longest_flow_pays_when_all_together_are_over_their_bound():
    queue = FairQueue(quantum=8, flow_limit=100, total_limit=120)
    dropped = []
    queue.push("flood", 7, SOURCE, *batch(7, 0, 100), 0.0, dropped)
    queue.push("light", 8, SOURCE, *batch(8, 0, 30), 0.0, dropped)
    assert dropped == [(7, DropReason.QUEUE_FULL, 10)]
    assert len(queue) == 120 and queue.overflows == 10
    served = served_datagrams(queue.pop(1000, 0.0, dropped))
    assert [s for f, s in served if f == 7] == list(range(10, 100))  # its oldest went
    assert [s for f, s in served if f == 8] == list(range(30))


def standing_queue(queue: FairQueue, delay: float, seconds: float, step: float = 0.001):
    """Feed flow 0 one datagram per `step` and serve one per `step`, each served
    datagram having waited `delay`: a standing queue. Returns the CoDel drop times."""
    dropped, drop_times = [], []
    backlog = round(delay / step)
    now, serial = 0.0, 0
    for _ in range(backlog):  # the queue that stands
        queue.push(0, 0, SOURCE, *batch(0, serial, 1), now, dropped)
        serial += 1
        now += step
    while now < seconds:
        queue.push(0, 0, SOURCE, *batch(0, serial, 1), now, dropped)
        serial += 1
        before = len(dropped)
        queue.pop(1, now, dropped)
        if len(dropped) > before:
            drop_times.append(now)
        now += step
    assert all(reason is DropReason.QUEUE_DELAY for _, reason, _ in dropped)
    return drop_times


def test_codel_leaves_a_queue_below_target_alone():
    assert standing_queue(FairQueue(), delay=0.004, seconds=2.0) == []


def test_codel_drops_after_an_interval_above_target_then_faster_and_faster():
    drops = standing_queue(FairQueue(), delay=0.020, seconds=2.0)
    # the first drop once the head has been above target for a whole interval
    assert 0.100 <= drops[0] <= 0.125
    gaps = [b - a for a, b in itertools.pairwise(drops)]
    # the control law: the n-th gap is interval / sqrt(n) (give or take a step)
    for n, gap in enumerate(gaps[:8], start=1):
        assert abs(gap - 0.100 / sqrt(n)) <= 0.0021, (n, gap)


def test_limits_and_parameters_are_checked():
    for bad in (dict(quantum=0), dict(flow_limit=0), dict(target=0.2, interval=0.1)):
        with pytest.raises(UsageError):
            FairQueue(**bad)


def test_idle_flows_are_forgotten():
    queue = FairQueue()
    dropped = []
    queue.push(5, 5, SOURCE, *batch(5, 0, 3), 100.0, dropped)
    queue.pop(10, 100.0, dropped)
    queue.forget_idle(100.0 + 16 * queue.interval)
    assert queue._flows == {} and queue.flows == 0


def test_a_flow_at_its_bound_takes_nothing_more_and_says_so_beforehand():
    queue = FairQueue(flow_limit=50)
    dropped = []
    queue.push(3, 3, SOURCE, *batch(3, 0, 40), 0.0, dropped)
    assert not queue.refuses(3, 40) and not queue.refuses(4, 40)
    queue.push(3, 3, SOURCE, *batch(3, 40, 40), 0.0, dropped)  # 10 fit, 30 do not
    assert dropped == [(3, DropReason.QUEUE_FULL, 30)]
    assert queue.refuses(3, 64) and queue.overflows == 30 + 64
    served = served_datagrams(queue.pop(100, 0.0, dropped))
    assert [s for _, s in served] == list(range(50))  # the newest went
    assert not queue.refuses(3, 1)
