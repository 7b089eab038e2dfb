"""The bounded cache of built AEAD contexts: idle keypairs hold only raw keys."""

import os

import pytest

from push_protocol.aead import CipherSuite
from push_protocol.ciphercache import SECOND_CHANCE_SCAN, CipherCache
from push_protocol.drops import UsageError
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd
from push_protocol.replay import ReplayWindow
from push_protocol.session import TunnelSession


def _keys(epoch: int = 0) -> KeyMaterial:
    return KeyMaterial(epoch, os.urandom(32), os.urandom(32), 0.0)


def _pair(cache: CipherCache, session_id: int = 1, keys: KeyMaterial | None = None):
    keys = keys or _keys()
    client = TunnelSession(session_id, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
    server = TunnelSession(
        session_id, CipherSuite.AES_256_GCM, Role.SERVER, keys, cipher_cache=cache
    )
    return client, server


def test_installed_sessions_build_nothing_until_a_packet_arrives():
    cache = CipherCache(capacity=4)
    sessions = [_pair(cache, i + 1)[1] for i in range(10)]
    assert len(cache) == 0 and cache.builds == 0
    assert all(s.current._contexts is None for s in sessions)


def test_the_cache_stays_bounded_and_evicted_keypairs_still_work():
    cache = CipherCache(capacity=3)
    pairs = [_pair(cache, i + 1) for i in range(8)]
    for round_ in range(3):
        for client, server in pairs:
            payload = f"packet {round_}".encode()
            assert server.open(client.seal(payload, 1.0), 1.0) == payload
            assert client.open(server.seal(payload, 1.0), 1.0) == payload
            assert len(cache) <= 3
    assert cache.evictions == cache.builds - len(cache) > 0
    held = sum(server.current._contexts is not None for _, server in pairs)
    assert held == len(cache)


def test_a_keypair_used_since_it_was_queued_gets_a_second_chance():
    cache = CipherCache(capacity=2)
    (c1, s1), (c2, s2), (c3, s3) = (_pair(cache, i) for i in (1, 2, 3))
    s1.open(c1.seal(b"a", 1.0), 1.0)  # s1 queued first
    s2.open(c2.seal(b"b", 1.0), 1.0)
    s1.open(c1.seal(b"c", 1.0), 1.0)  # s1 used again: not the victim
    s3.open(c3.seal(b"d", 1.0), 1.0)
    assert s1.current in cache and s2.current not in cache and s3.current in cache


def test_a_build_looks_at_a_bounded_number_of_entries():
    capacity = SECOND_CHANCE_SCAN * 3
    cache = CipherCache(capacity=capacity)
    pairs = [_pair(cache, i + 1) for i in range(capacity)]
    for client, server in pairs:
        server.open(client.seal(b"x", 1.0), 1.0)
    for client, server in pairs:  # every entry used since it was queued
        server.open(client.seal(b"y", 1.0), 1.0)
    newcomer_client, newcomer = _pair(cache, 999)
    newcomer.open(newcomer_client.seal(b"z", 1.0), 1.0)
    assert len(cache) == capacity and cache.evictions == 1
    # the victim is the entry after the scanned ones, not a full pass over the cache
    assert pairs[SECOND_CHANCE_SCAN][1].current not in cache


def test_removed_sessions_and_replaced_keys_release_their_contexts():
    cache = CipherCache(capacity=8)
    keys = _keys(0)
    client, server = _pair(cache, keys=keys)
    server.open(client.seal(b"x", 1.0), 1.0)
    old = server.current
    assert old in cache
    new_keys = _keys(1)
    client.install_next(new_keys, 1.0)
    server.install_next(new_keys, 1.0)
    server.open(client.seal(b"y", 1.0), 1.0)
    server.handle_timer(2.0)  # promoted on proof; previous kept for its grace period
    assert server.previous is old
    server.handle_timer(100.0)
    assert server.previous is None and old not in cache
    server.seal(b"z", 100.0)
    assert server.current in cache
    server.end(SessionEnd.CLOSED)
    assert len(cache) == 0


def test_bad_keys_are_refused_at_install_not_at_the_first_packet():
    keys = KeyMaterial(0, b"short", os.urandom(32), 0.0)
    with pytest.raises(UsageError):
        TunnelSession(1, CipherSuite.AES_256_GCM, Role.SERVER, keys)


def test_the_replay_ring_is_allocated_by_the_first_accepted_counter():
    window = ReplayWindow()
    window.check(5)
    assert window._ring is None
    window.update(5)
    assert window._ring is not None and window.highest == 5
