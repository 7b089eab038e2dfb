import ast
import itertools
from pathlib import Path

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


PRODUCT_PACKAGES = ("push_protocol", "pushgate_io", "dataplane", "client", "auth_service")
# The module that fires lifecycle events, and the one that defines them.
FIRES_EVENTS = {"push_protocol/session.py", "push_protocol/lifecycle.py"}
LIFECYCLE_NAMES = {"SessionEvent", "Lifecycle", "lifecycle", "_lifecycle"}


def test_only_the_session_fires_lifecycle_events():
    """h11's rule 1: what changes a session's state lives in one place. Everyone
    else says what happened through TunnelSession (install_next, end) and reads
    `state` / `is_live`; no other module names the events or the state machine."""
    root = Path(__file__).resolve().parent.parent
    elsewhere = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative in FIRES_EVENTS:
                continue
            for node in ast.walk(ast.parse(path.read_text(), relative)):
                if isinstance(node, ast.Name):
                    named = node.id
                elif isinstance(node, ast.Attribute):
                    named = node.attr
                    if ast.unparse(node.value).endswith("_pb2"):
                        continue  # control_pb2.SessionEvent: the feed's message
                elif isinstance(node, ast.alias):
                    named = node.name
                else:
                    continue
                if named in LIFECYCLE_NAMES:
                    elsewhere.append(f"{relative}:{getattr(node, 'lineno', '?')} {named}")
    assert elsewhere == []
    assert all((root / path).is_file() for path in FIRES_EVENTS)
