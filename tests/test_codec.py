import os

import pytest

from push_protocol import codec
from push_protocol.aead import CipherSuite, nonce_for
from push_protocol.codec import PacketType
from push_protocol.constants import HEADER_LEN, MAX_DATAGRAM_LEN, MIN_DATAGRAM_LEN, TAG_LEN
from push_protocol.drops import (
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
from pushgate_api import auth_pb2

KEY = bytes(range(32))


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_seal_then_open_returns_payload(suite):
    cipher = codec.new_cipher(suite, KEY)
    datagram = codec.seal(cipher, PacketType.DATA, 3, 0xDEADBEEF, 42, b"inner packet")
    header = codec.parse_header(datagram)
    assert header == codec.Header(PacketType.DATA, 3, 0xDEADBEEF, 42)
    assert len(datagram) == HEADER_LEN + len(b"inner packet") + TAG_LEN
    assert codec.open_payload(cipher, datagram, header.counter) == b"inner packet"


@pytest.mark.parametrize("implementation", ["reference", "compiled"])
def test_header_layout_is_byte_exact(implementation):
    cipher = (codec.PythonCipher if implementation == "reference" else codec.Cipher)(
        CipherSuite.AES_256_GCM, KEY
    )
    datagram = cipher.seal(PacketType.KEEPALIVE, 0x0102, 0x03040506, 0x0708090A0B0C0D0E, b"")
    assert datagram[:HEADER_LEN] == bytes.fromhex("01 02 0102 03040506 0708090a0b0c0d0e")


def test_nonce_is_four_zero_bytes_then_big_endian_counter():
    assert nonce_for(1) == bytes(11) + b"\x01"
    assert nonce_for(2**64 - 1) == bytes(4) + b"\xff" * 8


def test_keepalive_is_header_and_tag_only():
    cipher = codec.new_cipher(CipherSuite.AES_256_GCM, KEY)
    datagram = codec.seal(cipher, PacketType.KEEPALIVE, 0, 1, 0, b"")
    assert len(datagram) == MIN_DATAGRAM_LEN
    assert codec.open_payload(cipher, datagram, codec.parse_header(datagram).counter) == b""


def _valid(packet_type=PacketType.DATA, payload=b"x"):
    cipher = codec.new_cipher(CipherSuite.AES_256_GCM, KEY)
    return bytearray(codec.seal(cipher, packet_type, 0, 1, 0, payload))


@pytest.mark.parametrize(
    ("datagram", "error", "reason"),
    [
        (b"", TooShort, DropReason.TOO_SHORT),
        (bytes(MIN_DATAGRAM_LEN - 1), TooShort, DropReason.TOO_SHORT),
        (bytes(MAX_DATAGRAM_LEN + 1), TooLong, DropReason.TOO_LONG),
        (b"\x02" + bytes(MIN_DATAGRAM_LEN), BadVersion, DropReason.BAD_VERSION),
        (b"\x00" + bytes(MIN_DATAGRAM_LEN), BadVersion, DropReason.BAD_VERSION),
        (b"\x01\x00" + bytes(MIN_DATAGRAM_LEN), UnknownType, DropReason.UNKNOWN_TYPE),
        (b"\x01\x03" + bytes(MIN_DATAGRAM_LEN), UnknownType, DropReason.UNKNOWN_TYPE),
        (b"\x01\x01" + bytes(MIN_DATAGRAM_LEN - 2), BadLength, DropReason.BAD_LENGTH),
        (b"\x01\x02" + bytes(MIN_DATAGRAM_LEN - 1), BadLength, DropReason.BAD_LENGTH),
    ],
    ids=[
        "empty",
        "one-short",
        "oversized",
        "version-2",
        "version-0",
        "type-0",
        "type-3",
        "empty-data",
        "keepalive-with-payload",
    ],
)
def test_parse_header_names_what_is_wrong(datagram, error, reason):
    with pytest.raises(error) as caught:
        codec.parse_header(datagram)
    assert caught.value.reason is reason
    assert isinstance(caught.value, PacketRejected)


def test_altered_ciphertext_header_or_wrong_key_is_bad_tag():
    cipher = codec.new_cipher(CipherSuite.AES_256_GCM, KEY)
    for position in (0 + 2, HEADER_LEN, -1):  # header (AAD), ciphertext, tag
        datagram = _valid(payload=b"payload")
        datagram[position] ^= 0x01
        with pytest.raises(BadTag):
            codec.open_payload(cipher, bytes(datagram), 0)
    other = codec.new_cipher(CipherSuite.AES_256_GCM, os.urandom(32))
    with pytest.raises(BadTag):
        codec.open_payload(other, bytes(_valid()), 0)


def test_open_with_a_different_counter_is_bad_tag():
    cipher = codec.new_cipher(CipherSuite.AES_256_GCM, KEY)
    with pytest.raises(BadTag):
        codec.open_payload(cipher, bytes(_valid()), 1)


def test_seal_refuses_misuse():
    cipher = codec.new_cipher(CipherSuite.AES_256_GCM, KEY)
    with pytest.raises(UsageError):
        codec.seal(cipher, PacketType.DATA, 0, 1, 0, b"")
    with pytest.raises(UsageError):
        codec.seal(cipher, PacketType.KEEPALIVE, 0, 1, 0, b"x")
    with pytest.raises(UsageError):
        codec.seal(cipher, PacketType.DATA, 0, 1, 2**64, b"x")
    with pytest.raises(UsageError):
        codec.new_cipher(CipherSuite.AES_256_GCM, bytes(16))


def test_every_suite_has_one_api_code_and_back():
    """The one mapping between CipherSuite and the APIs' enum covers both sides."""
    named = {
        number
        for name, number in auth_pb2.CipherSuite.items()
        if name != "CIPHER_SUITE_UNSPECIFIED"
    }
    assert {suite.api_code for suite in CipherSuite} == named
    for suite in CipherSuite:
        assert CipherSuite.from_api_code(suite.api_code) is suite
    assert CipherSuite.from_api_code(auth_pb2.CIPHER_SUITE_UNSPECIFIED) is None
    assert CipherSuite.from_api_code(99) is None
