"""The client's connection state machine, as an explicit transition table.

DISCONNECTED --start--> LOGGING_IN --logged_in--> CONNECTING --tunnel_up--> UP
UP --rekey_started--> REKEYING --rekey_done | rekey_failed--> UP
CONNECTING | UP | REKEYING --server_lost--> RECONNECTING
RECONNECTING --tunnel_up--> UP            (same session, new UDP socket)
RECONNECTING --relogin--> LOGGING_IN      (the session is gone)
LOGGING_IN --login_failed--> RECONNECTING (retryable: unreachable, throttled)
any --stop--> DISCONNECTED
"""

from enum import StrEnum


class ClientState(StrEnum):
    DISCONNECTED = "disconnected"
    LOGGING_IN = "logging_in"
    CONNECTING = "connecting"
    UP = "up"
    REKEYING = "rekeying"
    RECONNECTING = "reconnecting"


class ClientEvent(StrEnum):
    START = "start"
    LOGGED_IN = "logged_in"
    LOGIN_FAILED = "login_failed"
    TUNNEL_UP = "tunnel_up"
    REKEY_STARTED = "rekey_started"
    REKEY_DONE = "rekey_done"
    REKEY_FAILED = "rekey_failed"
    SERVER_LOST = "server_lost"
    RELOGIN = "relogin"
    STOP = "stop"


S, E = ClientState, ClientEvent

TRANSITIONS: dict[tuple[ClientState, ClientEvent], ClientState] = {
    (S.DISCONNECTED, E.START): S.LOGGING_IN,
    (S.LOGGING_IN, E.LOGGED_IN): S.CONNECTING,
    (S.LOGGING_IN, E.LOGIN_FAILED): S.RECONNECTING,
    (S.CONNECTING, E.TUNNEL_UP): S.UP,
    (S.UP, E.REKEY_STARTED): S.REKEYING,
    (S.REKEYING, E.REKEY_DONE): S.UP,
    (S.REKEYING, E.REKEY_FAILED): S.UP,
    (S.REKEYING, E.RELOGIN): S.LOGGING_IN,  # the rekey found the session gone
    (S.CONNECTING, E.SERVER_LOST): S.RECONNECTING,
    (S.UP, E.SERVER_LOST): S.RECONNECTING,
    (S.REKEYING, E.SERVER_LOST): S.RECONNECTING,
    (S.RECONNECTING, E.TUNNEL_UP): S.UP,
    (S.RECONNECTING, E.RELOGIN): S.LOGGING_IN,
    **{(state, E.STOP): S.DISCONNECTED for state in S if state is not S.DISCONNECTED},
}

del S, E


class IllegalClientTransition(Exception):
    """A bug in the client: an event that cannot happen in the current state."""


class ClientStateMachine:
    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ClientState.DISCONNECTED

    def handle(self, event: ClientEvent) -> ClientState:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalClientTransition(
                f"cannot handle {event.value} in state {self.state.value}"
            ) from None
        return self.state
