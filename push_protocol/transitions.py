"""One transition-table state machine (h11's _state.py style), for every table we keep.

A subclass names its table and what it is the state of; an event not in the
table raises `IllegalTransition` (a programming error) naming state and event.
Used by the session lifecycle (push_protocol/lifecycle.py) and the client's
connection states (client/state.py).
"""

from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar

from .drops import IllegalTransition


class StateMachine:
    __slots__ = ("state",)

    transitions: ClassVar[Mapping[tuple[StrEnum, StrEnum], StrEnum]]
    subject: ClassVar[str]  # what has the state, for the error: "a session"

    def __init__(self, initial: StrEnum) -> None:
        self.state = initial

    def handle(self, event: StrEnum) -> StrEnum:
        try:
            self.state = self.transitions[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"cannot {event.value} {self.subject} in state {self.state.value}"
            ) from None
        return self.state
