"""The compiled packet cipher (push_protocol/_codec.c) against the reference,
`codec.PythonCipher`: the same datagrams for the same input, the same payload or
refusal for any datagram, the same errors for misuse. `make test` builds it, so
on Linux its absence is a failure, not a skip."""

import os
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from push_protocol import codec
from push_protocol.aead import CipherSuite
from push_protocol.constants import MAX_COUNTER, MIN_DATAGRAM_LEN

if not codec.COMPILED and not sys.platform.startswith("linux"):
    pytest.skip("the compiled cipher is built on Linux only", allow_module_level=True)

from push_protocol._codec import Cipher as CompiledCipher

KEYS = [bytes(range(32)), bytes(range(100, 132))]
suites = st.sampled_from(list(CipherSuite))
keys = st.sampled_from(KEYS)
epochs = st.integers(0, 0xFFFF)
session_ids = st.integers(0, 0xFFFFFFFF)
counters = st.integers(0, MAX_COUNTER)
packet_types = st.integers(0, 0xFF)
payloads = st.binary(min_size=1, max_size=1500)


def both(suite, key):
    return codec.PythonCipher(suite, key), CompiledCipher(suite, key)


def test_new_cipher_is_the_compiled_one_unless_pure_python_is_asked_for():
    assert (os.environ.get(codec.PURE_PYTHON_ENV) is None) == codec.COMPILED


@given(suites, keys, packet_types, epochs, session_ids, counters, st.binary(max_size=1500))
def test_seal_gives_the_same_datagram(suite, key, packet_type, epoch, session_id, counter, payload):
    reference, compiled = both(suite, key)
    expected = reference.seal(packet_type, epoch, session_id, counter, payload)
    assert compiled.seal(packet_type, epoch, session_id, counter, payload) == expected


@given(suites, keys, epochs, session_ids, counters, st.lists(payloads, max_size=20))
def test_seal_many_gives_the_same_datagrams(suite, key, epoch, session_id, counter, batch):
    counter = min(counter, MAX_COUNTER - len(batch))
    reference, compiled = both(suite, key)
    expected = reference.seal_many(epoch, session_id, counter, batch)
    assert compiled.seal_many(epoch, session_id, counter, batch) == expected


@given(suites, keys, keys, counters, counters, st.binary(max_size=300), st.data())
@settings(max_examples=300)
def test_open_agrees_on_every_datagram(
    suite, seal_key, open_key, counter, open_counter, body, data
):
    """Sealed ones (opened with the right or a wrong key or counter), altered ones,
    truncated ones and random bytes: the same payload, or None from both."""
    sealer, _ = both(suite, seal_key)
    reference, compiled = both(suite, open_key)
    datagram = bytearray(sealer.seal(1, 0, 1, counter, body))
    what = data.draw(st.sampled_from(["as sealed", "bit flipped", "truncated", "random"]))
    if what == "bit flipped":
        bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
        datagram[bit // 8] ^= 1 << (bit % 8)
    elif what == "truncated":
        datagram = datagram[: data.draw(st.integers(0, len(datagram) - 1))]
    elif what == "random":
        datagram = bytearray(data.draw(st.binary(max_size=200)))
    for candidate in (counter, open_counter):
        expected = reference.open(bytes(datagram), candidate)
        assert compiled.open(bytes(datagram), candidate) == expected
        assert compiled.open(memoryview(datagram), candidate) == expected
    if what == "as sealed" and seal_key == open_key:
        assert compiled.open(bytes(datagram), counter) == body


def test_a_datagram_too_short_for_a_tag_opens_to_none_in_both():
    for cipher in both(CipherSuite.AES_256_GCM, KEYS[0]):
        for length in (0, 1, MIN_DATAGRAM_LEN - 1):
            assert cipher.open(bytes(length), 0) is None


def test_misuse_raises_in_both():
    reference, compiled = both(CipherSuite.AES_256_GCM, KEYS[0])
    for cipher in (reference, compiled):
        with pytest.raises(ValueError, match="payload"):
            cipher.seal_many(0, 1, 0, [b"x", b""])
    with pytest.raises(struct.error):
        reference.seal(1, 0, 1, 2**64, b"x")
    with pytest.raises(OverflowError):
        compiled.seal(1, 0, 1, 2**64, b"x")
    with pytest.raises(ValueError, match="key"):
        CompiledCipher(CipherSuite.AES_256_GCM, bytes(16))
    with pytest.raises(ValueError, match="suite"):
        CompiledCipher("rot13", KEYS[0])
    with pytest.raises(OverflowError):
        CompiledCipher(CipherSuite.AES_256_GCM, KEYS[0]).seal(1, 0x10000, 1, 0, b"x")
