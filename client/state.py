"""The client's connection state machine, as an explicit transition table.

DISCONNECTED --start--> LOGGING_IN --logged_in--> CONNECTING --tunnel_up--> UP
UP --rekey_started--> REKEYING --rekey_done | rekey_failed--> UP
CONNECTING | UP | REKEYING --server_lost--> RECONNECTING
RECONNECTING --tunnel_up--> UP            (same session, new UDP socket)
RECONNECTING --relogin--> LOGGING_IN      (the session is gone)
CONNECTING | UP | REKEYING --relogin--> LOGGING_IN (a rekey found it gone)
LOGGING_IN --login_failed--> RECONNECTING (retryable: unreachable, throttled)
any --stop--> DISCONNECTED

client/core.py decides which event happens when; an event not in the table
raises IllegalTransition (push_protocol/transitions.py).
"""

from enum import StrEnum

from push_protocol.transitions import StateMachine


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
    # a rekey found the session gone (one started while waiting may answer in any state)
    (S.REKEYING, E.RELOGIN): S.LOGGING_IN,
    (S.CONNECTING, E.RELOGIN): S.LOGGING_IN,
    (S.UP, E.RELOGIN): S.LOGGING_IN,
    (S.CONNECTING, E.SERVER_LOST): S.RECONNECTING,
    (S.UP, E.SERVER_LOST): S.RECONNECTING,
    (S.REKEYING, E.SERVER_LOST): S.RECONNECTING,
    (S.RECONNECTING, E.TUNNEL_UP): S.UP,
    (S.RECONNECTING, E.RELOGIN): S.LOGGING_IN,
    **{(state, E.STOP): S.DISCONNECTED for state in S if state is not S.DISCONNECTED},
}

del S, E


class ClientStateMachine(StateMachine):
    __slots__ = ()
    transitions = TRANSITIONS
    subject = "the client"

    def __init__(self) -> None:
        super().__init__(ClientState.DISCONNECTED)
