"""Property tests of the dataplane's control-channel handlers (dataplane/sync.py).

Any sequence of feed events and re-lists, however odd (unknown ids, repeated
installs, epochs out of order, addresses moving between sessions), leaves the
one registry consistent, and a re-list makes it equal to the listing; every
keypair seals in a send-counter range of its own, and keys first learned from a
listing are re-learned ones.
"""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.metrics import Counters
from dataplane.registry import Registry, packed_address
from dataplane.sync import SessionSync
from netlab.feed import session
from push_protocol.constants import SEND_COUNTER_RANGE
from pushgate_api import auth_pb2, control_pb2

IDS = st.integers(1, 6)
ADDRESSES = st.sampled_from([f"198.19.0.{n}" for n in range(2, 6)])
EPOCHS = st.integers(0, 3)


def keys(epoch: int) -> auth_pb2.SessionKeys:
    return auth_pb2.SessionKeys(
        key_epoch=epoch,
        client_to_server_key=os.urandom(32),
        server_to_client_key=os.urandom(32),
        created_at_unix_ms=0,
    )


install = st.builds(lambda i, a, e: ("install", i, a, e), IDS, ADDRESSES, EPOCHS)
rotate = st.builds(lambda i, e: ("rotate", i, None, e), IDS, EPOCHS)
remove = st.builds(lambda i: ("remove", i, None, None), IDS)
relist = st.builds(lambda ids: ("relist", ids, None, None), st.sets(IDS, max_size=4))


def check_consistent(registry: Registry) -> None:
    for address, record in registry.by_address.items():
        assert registry.by_id.get(record.session_id) is record
        assert address in record.addresses
    for record in registry.by_id.values():
        assert record.tunnel.is_live
        for address in record.addresses:
            assert registry.by_address[address] is record


def keypairs(registry: Registry, session_id: int | None = None) -> list:
    records = registry.by_id.values() if session_id is None else [registry.by_id[session_id]]
    tunnels = [record.tunnel for record in records]
    pairs = [t.previous for t in tunnels] + [t.current for t in tunnels] + [t.next for t in tunnels]
    return [pair for pair in pairs if pair is not None]


@given(st.lists(st.one_of(install, rotate, remove, relist), max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_event_sequence_keeps_the_registry_consistent(steps):
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=40))
    ranges_used, seen = set(), []  # `seen` holds every keypair, so no id() is reused
    for revision, (kind, ident, address, epoch) in enumerate(steps, start=1):
        if kind == "install":
            sync.apply(
                control_pb2.SessionEvent(
                    revision=revision, installed=session(ident, address, keys(epoch))
                )
            )
        elif kind == "rotate":
            sync.apply(
                control_pb2.SessionEvent(
                    revision=revision,
                    rotated=control_pb2.KeyRotation(session_id=ident, keys=keys(epoch)),
                )
            )
        elif kind == "remove":
            sync.apply(
                control_pb2.SessionEvent(
                    revision=revision,
                    removed=control_pb2.SessionRemoval(
                        session_id=ident, reason=control_pb2.REMOVAL_REASON_LOGOUT
                    ),
                )
            )
        else:
            held = {  # the key epochs held before the listing
                i: {pair.epoch for pair in keypairs(registry, i)}
                for i in ident
                if i in registry.by_id
            }
            listed = [session(i, f"198.19.1.{i}", keys(0)) for i in sorted(ident)]
            ranges = control_pb2.CounterRanges(first=1000 * revision, count=2 * len(listed))
            sync.reconcile(
                control_pb2.ListSessionsResponse(
                    sessions=listed, revision=revision, counter_ranges=ranges
                )
            )
            assert set(registry.by_id) == set(ident)
            for i in ident:
                assert registry.by_address[packed_address(f"198.19.1.{i}")].session_id == i
                if i not in held or 0 not in held[i]:  # learned from the listing:
                    listed_keys = [p for p in keypairs(registry, i) if p.epoch == 0]
                    assert [p.relearned for p in listed_keys] == [True]  # maybe used before
        check_consistent(registry)
        assert sync.revision == revision
        for pair in keypairs(registry):  # each in a range of its own, never reused
            if not any(pair is known for known in seen):
                counter_range = pair._next_counter // SEND_COUNTER_RANGE
                assert counter_range not in ranges_used
                ranges_used.add(counter_range)
                seen.append(pair)


def _installed(revision: int, feed_session: control_pb2.Session) -> control_pb2.SessionEvent:
    return control_pb2.SessionEvent(revision=revision, installed=feed_session)


def test_bad_sessions_from_the_feed_are_logged_and_skipped_not_raised(caplog):
    """What the auth service sends is input: a session the protocol core would
    refuse as a bug is refused here with its reason, and the feed goes on."""
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=8))
    same = os.urandom(32)
    short = keys(0)
    short.client_to_server_key = b"short"
    future = keys(0)
    future.created_at_unix_ms = 2_000_000  # 1000 s after the sync's clock
    with_previous = session(5, "198.19.0.6", keys(3))
    with_previous.previous_keys.CopyFrom(keys(3))
    with_previous.previous_keys_until_unix_ms = 2_000_000
    bad = [
        (session(1, "198.19.0.2", short), "32-byte key"),
        (session(2, "198.19.0.3", keys(70000)), "does not fit in 16 bits"),
        (
            session(
                3,
                "198.19.0.4",
                auth_pb2.SessionKeys(
                    key_epoch=1, client_to_server_key=same, server_to_client_key=same
                ),
            ),
            "different keys",
        ),
        (session(4, "198.19.0.5", future), "after our clock's now"),
        (with_previous, "previous keys of the current epoch"),
        (session(6, "not an address", keys(0)), "does not appear to be an IPv4 or IPv6"),
    ]
    for revision, (feed_session, why) in enumerate(bad, start=1):
        caplog.clear()
        sync.apply(_installed(revision, feed_session))
        assert feed_session.session_id not in registry.by_id
        assert why in caplog.text and "not installed" in caplog.text
    sync.apply(_installed(10, session(7, "198.19.0.8", keys(0))))
    assert list(registry.by_id) == [7]
    check_consistent(registry)


def test_running_out_of_leased_counter_ranges_refuses_the_install():
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=1))
    sync.apply(_installed(1, session(1, "198.19.0.2", keys(0))))
    sync.apply(_installed(2, session(2, "198.19.0.3", keys(0))))  # no range left for it
    assert list(registry.by_id) == [1]
    sync.apply(
        control_pb2.SessionEvent(
            revision=3, rotated=control_pb2.KeyRotation(session_id=1, keys=keys(1))
        )
    )
    assert registry.by_id[1].tunnel.next is None  # refused too, the session carries on
