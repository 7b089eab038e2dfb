import os

import pytest

from push_protocol import constants
from push_protocol.aead import CipherSuite
from push_protocol.ciphercache import CipherCache
from push_protocol.codec import PacketType, parse_header
from push_protocol.drops import (
    BadTag,
    IllegalTransition,
    KeyExpired,
    Replayed,
    SessionExpired,
    UnknownKey,
    UnknownSession,
    UsageError,
)
from push_protocol.keys import KeyMaterial, Role, first_send_counter
from push_protocol.lifecycle import SessionEnd, SessionState
from push_protocol.session import TunnelSession, next_epoch

SID = 0x01020304


def _keys(epoch: int = 0, created_at: float = 0.0) -> KeyMaterial:
    return KeyMaterial(epoch, os.urandom(32), os.urandom(32), created_at)


def _pair(keys: KeyMaterial, suite=CipherSuite.AES_256_GCM, now=0.0):
    client = TunnelSession(SID, suite, Role.CLIENT, keys)
    server = TunnelSession(SID, suite, Role.SERVER, keys)
    return client, server


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_both_directions_carry_packets(suite):
    client, server = _pair(_keys(), suite)
    assert server.open(client.seal(b"up", 1.0), 1.0) == b"up"
    assert client.open(server.seal(b"down", 1.0), 1.0) == b"down"
    assert server.rx_packets == 1 and server.rx_bytes == 2
    assert server.last_received_at == 1.0


def test_directions_use_different_keys():
    client, _ = _pair(_keys())
    # A client's own packet reflected back to it must not authenticate.
    with pytest.raises(BadTag):
        client.open(client.seal(b"reflected", 1.0), 1.0)


def test_send_counters_never_repeat():
    client, _ = _pair(_keys())
    counters = [parse_header(client.seal(b"x", 1.0)).counter for _ in range(1000)]
    counters.append(parse_header(client.seal_keepalive(1.0)).counter)
    assert counters == sorted(set(counters))


def test_replayed_datagram_is_rejected_and_changes_nothing():
    client, server = _pair(_keys())
    datagram = client.seal(b"once", 1.0)
    server.open(datagram, 1.0)
    with pytest.raises(Replayed):
        server.open(datagram, 5.0)
    assert server.last_received_at == 1.0
    assert server.rx_packets == 1


def test_wrong_session_id_and_unknown_epoch():
    _, server = _pair(_keys())
    other = TunnelSession(SID + 1, CipherSuite.AES_256_GCM, Role.CLIENT, _keys())
    with pytest.raises(UnknownSession):
        server.open(other.seal(b"x", 1.0), 1.0)
    stranger = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, _keys(epoch=9))
    with pytest.raises(UnknownKey):
        server.open(stranger.seal(b"x", 1.0), 1.0)


def test_keepalive_opens_to_empty_payload():
    client, server = _pair(_keys())
    assert client.keepalive_due(0.0)
    datagram = client.seal_keepalive(1.0)
    assert parse_header(datagram).packet_type is PacketType.KEEPALIVE
    assert server.open(datagram, 1.0) == b""
    assert not client.keepalive_due(1.0 + constants.DEFAULT_KEEPALIVE_SECONDS - 0.1)
    assert client.keepalive_due(1.0 + constants.DEFAULT_KEEPALIVE_SECONDS)


def test_rekey_loses_no_packet_in_either_order():
    old = _keys(0)
    client, server = _pair(old)
    in_flight_old = client.seal(b"old key, still in flight", 10.0)
    new = _keys(next_epoch(0), created_at=10.0)
    # The server learns the new keys first; it keeps sending with the old ones
    # until the client proves it has the new keys.
    server.install_next(new, 10.0)
    assert server.state is SessionState.REKEYING
    assert client.open(server.seal(b"a", 10.1), 10.1) == b"a"
    client.install_next(new, 10.2)
    # The client sends under the new keys only after confirmation or timeout.
    assert parse_header(client.seal(b"b", 10.3)).key_epoch == 0
    assert server.open(client.seal(b"b", 10.3), 10.3) == b"b"
    promoted_at = 10.2 + constants.NEXT_KEY_PROMOTE_SECONDS
    first_new = client.seal(b"c", promoted_at)
    assert parse_header(first_new).key_epoch == 1
    assert client.state is SessionState.ACTIVE
    assert server.open(first_new, promoted_at) == b"c"  # confirmation: server promotes
    assert server.state is SessionState.ACTIVE
    assert parse_header(server.seal(b"d", promoted_at)).key_epoch == 1
    # Old packets still in flight are accepted during the grace period only.
    assert server.open(in_flight_old, promoted_at + 1) == b"old key, still in flight"
    late_old = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, old)
    late_old.current._next_counter = 10**6
    late = late_old.seal(b"too late", 0.0)
    server.handle_timer(promoted_at + constants.PREVIOUS_KEY_GRACE_SECONDS)
    assert server.previous is None
    with pytest.raises(UnknownKey):
        server.open(late, promoted_at + constants.PREVIOUS_KEY_GRACE_SECONDS)


def test_a_second_rekey_keeps_the_keys_the_peer_may_already_use():
    """Two rekeys in quick succession: the server promoted the first new keys (its
    timer) and replies with them, while the client, which never saw a packet under
    them, gets the second new keys. The client must still open those replies: the
    keys it had as next become current, not released."""
    client, server = _pair(_keys(0))
    first, second = _keys(1, created_at=10.0), _keys(2, created_at=10.5)
    client.install_next(first, 10.0)
    server.install_next(first, 10.0)
    promoted_at = 10.0 + constants.NEXT_KEY_PROMOTE_SECONDS
    server.handle_timer(promoted_at)  # no proof came: promoted anyway
    reply = server.seal(b"under the first new keys", promoted_at)
    assert parse_header(reply).key_epoch == 1
    client.install_next(second, promoted_at)
    assert client.open(reply, promoted_at) == b"under the first new keys"
    # the client sends with the keys the server has as current; then the second
    # rekey completes as any other
    request = client.seal(b"request", promoted_at)
    assert parse_header(request).key_epoch == 1
    assert server.open(request, promoted_at) == b"request"
    server.install_next(second, promoted_at + 0.1)
    later = promoted_at + 0.1 + constants.NEXT_KEY_PROMOTE_SECONDS
    assert parse_header(client.seal(b"x", later)).key_epoch == 2
    assert server.open(client.seal(b"y", later), later) == b"y"
    assert client.open(server.seal(b"z", later), later) == b"z"


def test_timers_report_the_next_deadline():
    client, _ = _pair(_keys())
    assert client.get_timer() is None
    client.install_next(_keys(1, 5.0), 5.0)
    assert client.get_timer() == 5.0 + constants.NEXT_KEY_PROMOTE_SECONDS
    client.handle_timer(5.0 + constants.NEXT_KEY_PROMOTE_SECONDS)
    assert client.current.epoch == 1
    assert client.get_timer() == pytest.approx(
        5.0 + constants.NEXT_KEY_PROMOTE_SECONDS + constants.PREVIOUS_KEY_GRACE_SECONDS
    )


def test_install_current_epoch_again_is_a_usage_error():
    client, _ = _pair(_keys())
    with pytest.raises(UsageError):
        client.install_next(_keys(0), 1.0)


def test_rekey_is_due_before_the_hard_limit():
    client, _ = _pair(_keys())
    assert not client.needs_rekey(constants.REKEY_AFTER_SECONDS - 1)
    assert client.needs_rekey(constants.REKEY_AFTER_SECONDS)
    client.current.sent = constants.REKEY_AFTER_MESSAGES
    assert client.needs_rekey(1.0)
    client.install_next(_keys(1), 1.0)
    assert not client.needs_rekey(1.0)


def test_hard_limits_refuse_sending_and_receiving():
    client, server = _pair(_keys())
    datagram = client.seal(b"x", 1.0)
    with pytest.raises(KeyExpired):
        client.seal(b"x", constants.REJECT_AFTER_SECONDS)
    with pytest.raises(KeyExpired):
        server.open(datagram, constants.REJECT_AFTER_SECONDS)
    fresh_client, fresh_server = _pair(_keys())
    fresh_client.current.sent = constants.REJECT_AFTER_MESSAGES
    with pytest.raises(KeyExpired):
        fresh_client.seal(b"x", 1.0)
    fresh_server.current.received = constants.REJECT_AFTER_MESSAGES
    with pytest.raises(KeyExpired):
        fresh_server.open(_pair(_keys())[0].seal(b"x", 1.0), 1.0)


def test_keypairs_in_different_counter_ranges_never_share_a_nonce():
    """A restarted dataplane re-learns keys: each keypair seals in its own range
    (leased from the auth service), so two incarnations never use one (key, nonce),
    whatever their clocks say."""
    keys = _keys(created_at=100.0)
    first = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, keys, counter_range=1)
    # The first incarnation uses its whole range ...
    first.current._next_counter += constants.REJECT_AFTER_MESSAGES - 1
    first.current.sent = constants.REJECT_AFTER_MESSAGES - 1
    last = parse_header(first.seal(b"x", 105.0)).counter
    assert last == first_send_counter(2) - 1
    with pytest.raises(KeyExpired):
        first.seal(b"x", 105.0)
    # ... and the next one, its clock stepped back, starts above it.
    second = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, keys, counter_range=2)
    assert parse_header(second.seal(b"x", 50.0)).counter == last + 1
    with pytest.raises(UsageError):
        first_send_counter(constants.SEND_COUNTER_RANGES)


@pytest.mark.parametrize("why", list(SessionEnd))
@pytest.mark.parametrize("rekeying", [False, True])
def test_an_ended_session_refuses_packets_releases_its_keys_and_ends_once(why, rekeying):
    keys, cache = _keys(), CipherCache(8)
    client = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
    server = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, keys, cipher_cache=cache)
    if rekeying:
        server.install_next(_keys(epoch=1), 0.5)
        assert server.state is SessionState.REKEYING
    datagram = client.seal(b"x", 1.0)
    server.seal(b"y", 0.9)  # builds its send context
    assert len(cache) >= 1
    server.end(why)
    assert server.state is SessionState.REMOVED and not server.is_live
    with pytest.raises(SessionExpired):
        server.open(datagram, 1.0)
    with pytest.raises(SessionExpired):
        server.seal(b"x", 1.0)
    assert len(cache) == 0
    with pytest.raises(IllegalTransition, match="removed"):
        server.end(why)
    assert issubclass(IllegalTransition, UsageError)  # a programming error, not bad input


def test_keys_never_appear_in_repr():
    keys = _keys()
    assert keys.client_to_server.hex() not in repr(keys)
    assert str(keys.client_to_server) not in repr(keys)


def test_session_id_must_fit_the_header():
    with pytest.raises(UsageError):
        TunnelSession(1 << 32, CipherSuite.AES_256_GCM, Role.CLIENT, _keys())
