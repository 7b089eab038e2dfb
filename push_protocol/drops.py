"""Why a packet was dropped, and the errors that carry the reason.

`DropReason` is the one enum shared by the codec, the dataplane's receive loop
and its metrics: its values are the bounded `reason` label of the drop counter.

Errors come in two kinds (as in h11): `PacketRejected` means the peer or the
network sent something wrong; the caller counts it and carries on. `UsageError`
means our own code is wrong (a bug: an API called with arguments or in a state it
does not take); it is raised to the caller and never caught to carry on. Every
programming error in push_protocol and dataplane is a `UsageError`. Bad input
(packets, configuration, what the auth service sends) is never one: it is a
counted drop or an error of its own, converted at the boundary that reads it.
"""

from enum import StrEnum


class DropReason(StrEnum):
    # Cheap header checks, before any state is touched.
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_LENGTH = "bad_length"
    # Lookups.
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_KEY = "unknown_key"
    SESSION_EXPIRED = "session_expired"
    KEY_EXPIRED = "key_expired"
    # Cryptography and replay.
    BAD_TAG = "bad_tag"
    REPLAY = "replay"
    TOO_OLD = "too_old"
    # The inner packet and where it goes.
    INNER_MALFORMED = "inner_malformed"
    SPOOFED_SOURCE = "spoofed_source"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"  # the session has not sent an authenticated packet yet
    TOO_BIG = "too_big"
    # Local resources.
    QUEUE_FULL = "queue_full"
    QUEUE_DELAY = "queue_delay"  # CoDel: waited too long in a receive queue (fair_queue.py)
    TUN_WRITE_ERROR = "tun_write_error"
    SOCKET_ERROR = "socket_error"
    # Authentic, but under keys re-learned after a dataplane restart: the counter may
    # have been accepted before, so the packet is not delivered; the client is asked
    # to rekey (docs/protocol.md, "Restarts").
    REKEY_REQUIRED = "rekey_required"
    SOURCE_OVER_BUDGET = "source_over_budget"  # its source forged too many tags lately
    FORBIDDEN_DESTINATION = "forbidden_destination"  # the gateway host, link-local, denied nets
    NO_BUFFER_SPACE = "no_buffer_space"  # a UDP send refused (ENOBUFS): transmit queue full
    POLICY_DENIED = "policy_denied"  # its session's access policy does not allow it


class PacketRejected(Exception):
    """A datagram or packet from the network was wrong; count it and carry on."""

    reason: DropReason

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason.value)
        self.detail = detail


class TooShort(PacketRejected):
    """Shorter than a header and a tag."""

    reason = DropReason.TOO_SHORT


class TooLong(PacketRejected):
    """Longer than any datagram a peer sends."""

    reason = DropReason.TOO_LONG


class BadVersion(PacketRejected):
    """Unknown protocol version."""

    reason = DropReason.BAD_VERSION


class UnknownType(PacketRejected):
    """Unknown packet type."""

    reason = DropReason.UNKNOWN_TYPE


class BadLength(PacketRejected):
    """A length the packet type cannot have (a keepalive with payload, empty data)."""

    reason = DropReason.BAD_LENGTH


class UnknownSession(PacketRejected):
    """No live session has this id."""

    reason = DropReason.UNKNOWN_SESSION


class UnknownKey(PacketRejected):
    """The session has no keys of this epoch."""

    reason = DropReason.UNKNOWN_KEY


class SessionExpired(PacketRejected):
    """The session no longer accepts packets."""

    reason = DropReason.SESSION_EXPIRED


class KeyExpired(PacketRejected):
    """The key reached its hard message or time limit."""

    reason = DropReason.KEY_EXPIRED


class BadTag(PacketRejected):
    """Authentication failed: wrong key, or the packet was altered."""

    reason = DropReason.BAD_TAG


class Replayed(PacketRejected):
    """The counter was seen before."""

    reason = DropReason.REPLAY


class TooOld(PacketRejected):
    """The counter is behind the replay window."""

    reason = DropReason.TOO_OLD


class RekeyRequired(PacketRejected):
    """Authentic, under keys re-learned after a restart: not delivered (docs/protocol.md)."""

    reason = DropReason.REKEY_REQUIRED


class UsageError(Exception):
    """Our own code used an API wrongly: a bug, not bad input."""


class IllegalTransition(UsageError):
    """A session lifecycle event that is not allowed in the current state."""
