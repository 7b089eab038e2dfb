"""The session lifecycle as an explicit transition table (h11's _state.py style).

    ACTIVE --rotate--> REKEYING --rekey_done--> ACTIVE
    REKEYING --rotate--> REKEYING            (newer keys replace unconfirmed ones)
    ACTIVE | REKEYING --expire--> EXPIRED --remove--> REMOVED
    ACTIVE | REKEYING | EXPIRED --close--> CLOSED --remove--> REMOVED

Only ACTIVE and REKEYING sessions accept packets. Anything not in the table
raises `IllegalTransition` naming the state and the event.

Every event is fired by push_protocol/session.py (h11's rule: what changes state
lives in one place); its owners say what happened through `TunnelSession`'s
methods (`install_next`, `end`), never through `Lifecycle.handle`.
"""

from enum import StrEnum

from .transitions import StateMachine


class SessionState(StrEnum):
    ACTIVE = "active"
    REKEYING = "rekeying"  # new keys installed, not yet confirmed by the peer
    EXPIRED = "expired"
    CLOSED = "closed"
    REMOVED = "removed"


class SessionEnd(StrEnum):
    """Why a session ended, as its owner tells `TunnelSession.end`."""

    EXPIRED = "expired"  # its lifetime ran out
    CLOSED = "closed"  # logged out, replaced, ended by an admin, gone from the auth service


class SessionEvent(StrEnum):
    ROTATE = "rotate"
    REKEY_DONE = "rekey_done"
    EXPIRE = "expire"
    CLOSE = "close"
    REMOVE = "remove"


S, E = SessionState, SessionEvent

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.ACTIVE, E.ROTATE): S.REKEYING,
    (S.REKEYING, E.ROTATE): S.REKEYING,
    (S.REKEYING, E.REKEY_DONE): S.ACTIVE,
    (S.ACTIVE, E.EXPIRE): S.EXPIRED,
    (S.REKEYING, E.EXPIRE): S.EXPIRED,
    (S.ACTIVE, E.CLOSE): S.CLOSED,
    (S.REKEYING, E.CLOSE): S.CLOSED,
    (S.EXPIRED, E.CLOSE): S.CLOSED,
    (S.EXPIRED, E.REMOVE): S.REMOVED,
    (S.CLOSED, E.REMOVE): S.REMOVED,
}

LIVE_STATES = frozenset({S.ACTIVE, S.REKEYING})

del S, E


class Lifecycle(StateMachine):
    __slots__ = ()
    transitions = TRANSITIONS
    subject = "a session"

    def __init__(self) -> None:
        super().__init__(SessionState.ACTIVE)

    @property
    def is_live(self) -> bool:
        """True while the session accepts and sends packets."""
        return self.state in LIVE_STATES
