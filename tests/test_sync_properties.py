"""Property tests of the dataplane's control-channel handlers (dataplane/sync.py).

Any sequence of feed events and re-lists, however odd (unknown ids, repeated
installs, epochs out of order, addresses moving between sessions), leaves the
one registry consistent, and a re-list makes it equal to the listing.
"""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.metrics import Counters
from dataplane.registry import Registry, packed_address
from dataplane.sync import SessionSync
from netlab.feed import session
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
        assert record.tunnel.lifecycle.is_live
        for address in record.addresses:
            assert registry.by_address[address] is record


@given(st.lists(st.one_of(install, rotate, remove, relist), max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_event_sequence_keeps_the_registry_consistent(steps):
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: 1000.0)
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
            listed = [session(i, f"198.19.1.{i}", keys(0)) for i in sorted(ident)]
            sync.reconcile(control_pb2.ListSessionsResponse(sessions=listed, revision=revision))
            assert set(registry.by_id) == set(ident)
            for i in ident:
                assert registry.by_address[packed_address(f"198.19.1.{i}")].session_id == i
        check_consistent(registry)
        assert sync.revision == revision
