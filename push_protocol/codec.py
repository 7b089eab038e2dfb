"""The push packet: parse and build the header, seal and open the payload.

Layout (docs/protocol.md is the definition):

    0       1       2               4               8                       16
    +-------+-------+---------------+---------------+-----------------------+
    |version| type  |   key_epoch   |  session_id   |        counter        |
    +-------+-------+---------------+---------------+-----------------------+
    | ciphertext (payload length)                  ...  | tag (16 bytes)    |
    +-----------------------------------------------------------------------+

The 16-byte header is the AEAD's associated data; the nonce is derived from the
counter. `read_header` does O(header) work and touches no state, so a datagram
that is wrong in any cheap way is rejected before a session is even looked up.
"""

import contextlib
import os
import struct
from enum import IntEnum
from typing import NamedTuple

from cryptography.exceptions import InvalidTag

from .aead import CipherSuite, check_key, new_aead, nonce_for
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
    PacketRejected,
    TooLong,
    TooShort,
    UnknownType,
    UsageError,
)

# Set (to anything) to run the pure-Python cipher where the compiled one is built.
PURE_PYTHON_ENV = "PUSHGATE_PURE_PYTHON"

_HEADER = struct.Struct("!BBHIQ")
assert _HEADER.size == HEADER_LEN


class PacketType(IntEnum):
    DATA = 1  # payload is one inner IP packet
    KEEPALIVE = 2  # empty payload; proves liveness, keeps NAT mappings open
    # Empty payload, sent only by the dataplane: "I cannot accept data under this
    # key (re-learned after a restart); get new keys" (docs/protocol.md, "Restarts").
    REKEY_REQUIRED = 3


# int compares are cheaper
_DATA, _KEEPALIVE = int(PacketType.DATA), int(PacketType.KEEPALIVE)
_REKEY_REQUIRED = int(PacketType.REKEY_REQUIRED)


class Header(NamedTuple):
    packet_type: PacketType
    key_epoch: int
    session_id: int
    counter: int


_new_header = tuple.__new__  # Header(...) without the generated __new__'s extra frame


def read_header(
    datagram: bytes | bytearray | memoryview, from_server: bool = False
) -> Header | DropReason:
    """The header of `datagram`, or the reason it is rejected before any state is
    touched: the first wrong thing among length, version, type and length for
    that type. No exception is built, so the receive loop counts a flood of
    noise at the cost of a few comparisons per datagram. A client sends DATA and
    KEEPALIVE; the dataplane (`from_server`) also REKEY_REQUIRED."""
    length = len(datagram)
    if length < MIN_DATAGRAM_LEN:
        return DropReason.TOO_SHORT
    if length > MAX_DATAGRAM_LEN:
        return DropReason.TOO_LONG
    version, packet_type, key_epoch, session_id, counter = _HEADER.unpack_from(datagram)
    if version != PROTOCOL_VERSION:
        return DropReason.BAD_VERSION
    if packet_type == _DATA:
        if length == MIN_DATAGRAM_LEN:
            return DropReason.BAD_LENGTH
        return _new_header(Header, (PacketType.DATA, key_epoch, session_id, counter))
    if packet_type == _KEEPALIVE:
        if length != MIN_DATAGRAM_LEN:
            return DropReason.BAD_LENGTH
        return _new_header(Header, (PacketType.KEEPALIVE, key_epoch, session_id, counter))
    if packet_type == _REKEY_REQUIRED and from_server:
        if length != MIN_DATAGRAM_LEN:
            return DropReason.BAD_LENGTH
        return _new_header(Header, (PacketType.REKEY_REQUIRED, key_epoch, session_id, counter))
    return DropReason.UNKNOWN_TYPE


def parse_header(datagram: bytes | bytearray | memoryview, from_server: bool = False) -> Header:
    """`read_header`, raising the `PacketRejected` subclass that names what is wrong."""
    header = read_header(datagram, from_server)
    if type(header) is Header:
        return header
    raise _rejection(header, datagram)


def _rejection(reason: DropReason, datagram) -> PacketRejected:
    length = len(datagram)
    if reason is DropReason.TOO_SHORT:
        return TooShort(f"{length} bytes, need at least {MIN_DATAGRAM_LEN}")
    if reason is DropReason.TOO_LONG:
        return TooLong(f"{length} bytes, at most {MAX_DATAGRAM_LEN}")
    if reason is DropReason.BAD_VERSION:
        return BadVersion(f"version {datagram[0]}, expected {PROTOCOL_VERSION}")
    if reason is DropReason.UNKNOWN_TYPE:
        return UnknownType(f"type {datagram[1]}")
    if datagram[1] != _DATA:
        name = PacketType(datagram[1]).name.lower()
        return BadLength(f"{name} with {length - MIN_DATAGRAM_LEN} payload bytes")
    return BadLength("data packet with an empty payload")


class PythonCipher:
    """Seals and opens datagrams under one key: the reference implementation.

    `_codec.Cipher` (push_protocol/_codec.c) does the same in one buffer per
    datagram and is what `new_cipher` gives where it was built; this one runs
    everywhere else (the Windows client) and defines what both must do
    (tests/test_codec_compiled.py). Neither checks what the callers below check
    once per call: counter range, and which packet types carry a payload.
    """

    __slots__ = ("_aead",)

    def __init__(self, suite: CipherSuite, key: bytes) -> None:
        self._aead = new_aead(suite, key)

    def seal(
        self, packet_type: int, key_epoch: int, session_id: int, counter: int, payload: bytes
    ) -> bytes:
        header = _HEADER.pack(PROTOCOL_VERSION, packet_type, key_epoch, session_id, counter)
        return header + self._aead.encrypt(nonce_for(counter), payload, header)

    def seal_many(
        self, key_epoch: int, session_id: int, first_counter: int, payloads: list[bytes]
    ) -> list[bytes]:
        encrypt, pack = self._aead.encrypt, _HEADER.pack
        datagrams = []
        counter = first_counter
        for payload in payloads:
            if not payload:
                raise ValueError("data packets carry a payload")
            header = pack(PROTOCOL_VERSION, _DATA, key_epoch, session_id, counter)
            datagrams.append(header + encrypt(nonce_for(counter), payload, header))
            counter += 1
        return datagrams

    def open(self, datagram: bytes, counter: int) -> bytes | None:
        """The payload, or None if `datagram` does not authenticate (a datagram
        too short to hold a header and a tag never does)."""
        try:
            return self._aead.decrypt(
                nonce_for(counter), datagram[HEADER_LEN:], datagram[:HEADER_LEN]
            )
        except InvalidTag:
            return None


Cipher = PythonCipher
if not os.environ.get(PURE_PYTHON_ENV):
    # not built here (Windows, no compiler): the reference runs
    with contextlib.suppress(ImportError):
        from ._codec import Cipher  # type: ignore[no-redef]
COMPILED = Cipher is not PythonCipher


def new_cipher(suite: CipherSuite, key: bytes) -> "Cipher":
    """The cipher of one key: the compiled one where it was built, unless
    PUSHGATE_PURE_PYTHON is set."""
    check_key(suite, key)
    return Cipher(suite, key)


def seal(
    cipher: Cipher,
    packet_type: PacketType,
    key_epoch: int,
    session_id: int,
    counter: int,
    payload: bytes,
) -> bytes:
    """Return the datagram carrying `payload` sealed by `cipher` with `counter`."""
    if (packet_type == PacketType.DATA) != bool(payload):
        raise UsageError("only data packets carry a payload, and always one")
    if not 0 <= counter <= MAX_COUNTER:
        raise UsageError(f"counter {counter} out of range")
    return cipher.seal(packet_type, key_epoch, session_id, counter, payload)


def seal_many(
    cipher: Cipher, key_epoch: int, session_id: int, first_counter: int, payloads: list[bytes]
) -> list[bytes]:
    """`seal` of one DATA packet per payload, with counters from `first_counter` up."""
    if first_counter < 0 or first_counter + len(payloads) - 1 > MAX_COUNTER:
        raise UsageError(f"counters from {first_counter} for {len(payloads)} packets out of range")
    if not all(payloads):
        raise UsageError("keepalives carry no payload and data packets carry some")
    return cipher.seal_many(key_epoch, session_id, first_counter, payloads)


def open_payload(cipher: Cipher, datagram: bytes, counter: int) -> bytes:
    """Authenticate and decrypt a datagram whose header `read_header` accepted."""
    payload = cipher.open(datagram, counter)
    if payload is None:
        raise BadTag()
    return payload
