import itertools

import pytest

from push_protocol.drops import IllegalTransition
from push_protocol.lifecycle import TRANSITIONS, Lifecycle, SessionEvent, SessionState


def _in_state(state: SessionState) -> Lifecycle:
    lifecycle = Lifecycle()
    lifecycle.state = state
    return lifecycle


def test_starts_active_and_live():
    lifecycle = Lifecycle()
    assert lifecycle.state is SessionState.ACTIVE
    assert lifecycle.is_live


def test_rekey_round_trip():
    lifecycle = Lifecycle()
    assert lifecycle.handle(SessionEvent.ROTATE) is SessionState.REKEYING
    assert lifecycle.is_live
    assert lifecycle.handle(SessionEvent.ROTATE) is SessionState.REKEYING
    assert lifecycle.handle(SessionEvent.REKEY_DONE) is SessionState.ACTIVE


def test_expire_then_remove():
    lifecycle = Lifecycle()
    lifecycle.handle(SessionEvent.EXPIRE)
    assert not lifecycle.is_live
    assert lifecycle.handle(SessionEvent.REMOVE) is SessionState.REMOVED


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in itertools.product(SessionState, SessionEvent) if pair not in TRANSITIONS],
)
def test_every_transition_not_in_the_table_raises_naming_the_state(state, event):
    lifecycle = _in_state(state)
    with pytest.raises(IllegalTransition, match=state.value):
        lifecycle.handle(event)
    assert lifecycle.state is state


def test_removed_is_terminal():
    assert not any(state is SessionState.REMOVED for state, _ in TRANSITIONS)
