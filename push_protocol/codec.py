"""The push packet: parse and build the header, seal and open the payload.

Layout (docs/protocol.md is the definition):

    0       1       2               4               8                       16
    +-------+-------+---------------+---------------+-----------------------+
    |version| type  |   key_epoch   |  session_id   |        counter        |
    +-------+-------+---------------+---------------+-----------------------+
    | ciphertext (payload length)                  ...  | tag (16 bytes)    |
    +-----------------------------------------------------------------------+

The 16-byte header is the AEAD's associated data; the nonce is derived from the
counter. `parse_header` does O(header) work and touches no state, so a datagram
that is wrong in any cheap way is rejected before a session is even looked up.
"""

import struct
from enum import IntEnum
from typing import NamedTuple

from cryptography.exceptions import InvalidTag

from .aead import AEAD, nonce_for
from .constants import (
    HEADER_LEN,
    MAX_COUNTER,
    MAX_DATAGRAM_LEN,
    MIN_DATAGRAM_LEN,
    PROTOCOL_VERSION,
)
from .drops import (
    BadLength,
    BadTag,
    BadVersion,
    DropReason,
    TooLong,
    TooShort,
    UnknownType,
    UsageError,
)

_HEADER = struct.Struct("!BBHIQ")
assert _HEADER.size == HEADER_LEN


class PacketType(IntEnum):
    DATA = 1  # payload is one inner IP packet
    KEEPALIVE = 2  # empty payload; proves liveness, keeps NAT mappings open


_TYPES = {int(t): t for t in PacketType}  # a dict lookup: cheaper than PacketType(n)


class Header(NamedTuple):
    packet_type: PacketType
    key_epoch: int
    session_id: int
    counter: int


_new_header = tuple.__new__  # Header(...) without the generated __new__'s extra frame


def parse_header(datagram: bytes | bytearray | memoryview) -> Header:
    """Check the cheap things about a datagram and return its header.

    Raises a `PacketRejected` subclass naming the first thing that is wrong.
    """
    length = len(datagram)
    if length < MIN_DATAGRAM_LEN:
        raise TooShort(f"{length} bytes, need at least {MIN_DATAGRAM_LEN}")
    if length > MAX_DATAGRAM_LEN:
        raise TooLong(f"{length} bytes, at most {MAX_DATAGRAM_LEN}")
    version, packet_type, key_epoch, session_id, counter = _HEADER.unpack_from(datagram)
    if version != PROTOCOL_VERSION:
        raise BadVersion(f"version {version}, expected {PROTOCOL_VERSION}")
    known = _TYPES.get(packet_type)
    if known is None:
        raise UnknownType(f"type {packet_type}")
    if known is PacketType.KEEPALIVE:
        if length != MIN_DATAGRAM_LEN:
            raise BadLength(f"keepalive with {length - MIN_DATAGRAM_LEN} payload bytes")
    elif length == MIN_DATAGRAM_LEN:
        raise BadLength("data packet with an empty payload")
    return _new_header(Header, (known, key_epoch, session_id, counter))


def header_drop_reason(datagram: bytes | bytearray | memoryview) -> DropReason | None:
    """The reason `parse_header` would reject `datagram` for, or None if it would not.

    The same checks in the same order, without building an exception: the
    receive loop's first look at every datagram, so a flood of noise is counted
    at the cost of a few comparisons each.
    """
    length = len(datagram)
    if length < MIN_DATAGRAM_LEN:
        return DropReason.TOO_SHORT
    if length > MAX_DATAGRAM_LEN:
        return DropReason.TOO_LONG
    if datagram[0] != PROTOCOL_VERSION:
        return DropReason.BAD_VERSION
    packet_type = datagram[1]
    if packet_type == PacketType.DATA:
        return DropReason.BAD_LENGTH if length == MIN_DATAGRAM_LEN else None
    if packet_type == PacketType.KEEPALIVE:
        return DropReason.BAD_LENGTH if length != MIN_DATAGRAM_LEN else None
    return DropReason.UNKNOWN_TYPE


def build_header(packet_type: PacketType, key_epoch: int, session_id: int, counter: int) -> bytes:
    if not 0 <= counter <= MAX_COUNTER:
        raise UsageError(f"counter {counter} out of range")
    return _HEADER.pack(PROTOCOL_VERSION, packet_type, key_epoch, session_id, counter)


def seal(
    aead: AEAD,
    packet_type: PacketType,
    key_epoch: int,
    session_id: int,
    counter: int,
    payload: bytes,
) -> bytes:
    """Return the datagram carrying `payload` encrypted under `aead` with `counter`."""
    if (packet_type == PacketType.KEEPALIVE) != (not payload):
        raise UsageError("keepalives carry no payload and data packets carry some")
    header = build_header(packet_type, key_epoch, session_id, counter)
    return header + aead.encrypt(nonce_for(counter), payload, header)


def open_payload(aead: AEAD, datagram: bytes, counter: int) -> bytes:
    """Authenticate and decrypt a datagram whose header `parse_header` accepted."""
    try:
        return aead.decrypt(nonce_for(counter), datagram[HEADER_LEN:], datagram[:HEADER_LEN])
    except InvalidTag:
        raise BadTag() from None
