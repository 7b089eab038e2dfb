"""Cipher suites and the counter nonce.

The nonce is 4 zero bytes followed by the packet's 64-bit counter (big endian).
Every key is used by one sender in one direction only and its counter never
repeats (keys.SendKey), so a (key, nonce) pair is never used twice.
"""

import struct
from enum import StrEnum

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pushgate_api import auth_pb2

from .constants import KEY_LEN
from .drops import UsageError


class CipherSuite(StrEnum):
    AES_256_GCM = "aes-256-gcm"  # default: ~3x faster per packet than ChaCha20 here (AES-NI)
    CHACHA20_POLY1305 = "chacha20-poly1305"

    @property
    def api_code(self) -> int:
        """Its number in the auth and control APIs (protos/auth.proto, CipherSuite)."""
        return _API_CODES[self]

    @classmethod
    def from_api_code(cls, code: int) -> "CipherSuite | None":
        """The suite an API message names; None for UNSPECIFIED or a number we don't know."""
        return _SUITES_BY_API_CODE.get(code)


# The one mapping between the suites and the APIs' enum.
_API_CODES = {
    CipherSuite.AES_256_GCM: auth_pb2.CIPHER_SUITE_AES_256_GCM,
    CipherSuite.CHACHA20_POLY1305: auth_pb2.CIPHER_SUITE_CHACHA20_POLY1305,
}
_SUITES_BY_API_CODE = {code: suite for suite, code in _API_CODES.items()}


DEFAULT_CIPHER_SUITE = CipherSuite.AES_256_GCM

_NONCE = struct.Struct(">4xQ")  # four zero bytes, then the counter

AEAD = AESGCM | ChaCha20Poly1305


def check_key(suite: CipherSuite, key: bytes) -> None:
    """Raise UsageError unless `key` fits `suite` (what new_aead would refuse)."""
    if len(key) != KEY_LEN:
        raise UsageError(f"{suite} needs a {KEY_LEN}-byte key, got {len(key)} bytes")
    if suite not in (CipherSuite.AES_256_GCM, CipherSuite.CHACHA20_POLY1305):
        raise UsageError(f"unknown cipher suite {suite!r}")


def new_aead(suite: CipherSuite, key: bytes) -> AEAD:
    check_key(suite, key)
    if suite is CipherSuite.AES_256_GCM:
        return AESGCM(key)
    if suite is CipherSuite.CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise UsageError(f"unknown cipher suite {suite!r}")


nonce_for = _NONCE.pack  # nonce_for(counter) -> the 12-byte nonce
