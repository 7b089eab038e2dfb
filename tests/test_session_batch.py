"""TunnelSession.open_many against `open` one datagram at a time: same results
(payload or drop reason) and same state after, for batches mixing fresh,
replayed, reordered, tampered, foreign, too-old and next-epoch datagrams."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from push_protocol.aead import CipherSuite
from push_protocol.codec import PacketType, parse_header
from push_protocol.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE
from push_protocol.drops import DropReason, PacketRejected
from push_protocol.keys import KeyMaterial, Role
from push_protocol.lifecycle import SessionEnd
from push_protocol.session import TunnelSession

SID = 0x0A0B0C0D
SUITE = CipherSuite.AES_256_GCM
KEYS = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
NEXT_KEYS = KeyMaterial(1, os.urandom(32), os.urandom(32), 0.0)

# What a datagram of a batch is, relative to the client's stream so far.
KINDS = ["fresh", "fresh", "fresh", "keepalive", "replay", "tampered", "foreign", "next_epoch"]


def _twins():
    """Two server sessions in the same state, both with next keys installed."""
    twins = [TunnelSession(SID, SUITE, Role.SERVER, KEYS) for _ in range(2)]
    for twin in twins:
        twin.install_next(NEXT_KEYS, 0.0)
    return twins


def _one_by_one(session: TunnelSession, datagrams: list, now: float) -> list:
    results = []
    for datagram in datagrams:
        try:
            results.append(session.open(datagram, now, parse_header(datagram)))
        except PacketRejected as rejected:
            results.append(rejected.reason)
    return results


def _state(session: TunnelSession) -> tuple:
    """What open and seal may change, in both directions."""
    keypairs = [session.previous, session.current, session.next]
    return (
        session.state,
        (session.last_received_at, session.rx_packets, session.rx_bytes),
        (session.last_sent_at, session.tx_packets, session.tx_bytes),
        [
            None if k is None else (k.epoch, k.received, k.replay.highest, k.sent, k._next_counter)
            for k in keypairs
        ],
    )


def _make_batches(plan):
    client = TunnelSession(SID, SUITE, Role.CLIENT, KEYS)
    client_next = TunnelSession(SID, SUITE, Role.CLIENT, NEXT_KEYS)
    stranger = TunnelSession(SID + 1, SUITE, Role.CLIENT, KEYS)
    sent: list[bytes] = []
    batches = []
    for kinds, shuffle_seed in plan:
        batch = []
        for n, kind in enumerate(kinds):
            if kind == "fresh" or (kind in ("replay", "tampered") and not sent):
                datagram = client.seal(b"packet %d" % n, 1.0)
                sent.append(datagram)
            elif kind == "keepalive":
                datagram = client.seal_keepalive(1.0)
                sent.append(datagram)
            elif kind == "replay":
                datagram = sent[n % len(sent)]
            elif kind == "tampered":
                damaged = bytearray(sent[-1])
                damaged[-1] ^= 0x40
                datagram = bytes(damaged)
            elif kind == "foreign":
                datagram = stranger.seal(b"not yours", 1.0)
            else:
                datagram = client_next.seal(b"under the next key", 1.0)
            batch.append(datagram)
        if shuffle_seed is not None:  # reordering within a batch
            batch = batch[shuffle_seed % len(batch) :] + batch[: shuffle_seed % len(batch)]
        batches.append(batch)
    return batches


plans = st.lists(
    st.tuples(
        st.lists(st.sampled_from(KINDS), min_size=1, max_size=20),
        st.none() | st.integers(0, 100),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(plans)
def test_open_many_is_open_one_by_one(plan):
    batched, single = _twins()
    for batch in _make_batches(plan):
        headers = [parse_header(d) for d in batch]
        assert batched.open_many(batch, headers, 2.0) == _one_by_one(single, batch, 2.0)
        assert _state(batched) == _state(single)


def test_a_batch_within_reach_of_a_limit_is_checked_packet_by_packet():
    batched, single = _twins()
    for twin in (batched, single):
        twin.current.received = REJECT_AFTER_MESSAGES - 2
    client = TunnelSession(SID, SUITE, Role.CLIENT, KEYS)
    batch = [client.seal(b"x", 1.0) for _ in range(4)]
    results = batched.open_many(batch, [parse_header(d) for d in batch], 2.0)
    assert results == _one_by_one(single, batch, 2.0)
    assert results[2:] == [DropReason.KEY_EXPIRED] * 2 and type(results[0]) is bytes


def test_too_old_and_closed_sessions_are_named():
    batched, single = _twins()
    client = TunnelSession(SID, SUITE, Role.CLIENT, KEYS)
    first = client.seal(b"first", 1.0)
    later = [client.seal(b"x", 1.0) for _ in range(REPLAY_WINDOW_SIZE + 1)][-1:]
    batch = [*later, first]
    results = batched.open_many(batch, [parse_header(d) for d in batch], 2.0)
    assert results == _one_by_one(single, batch, 2.0) == [b"x", DropReason.TOO_OLD]
    for twin in (batched, single):
        twin.end(SessionEnd.CLOSED)
    batch = [client.seal(b"y", 1.0)]
    results = batched.open_many(batch, [parse_header(d) for d in batch], 2.0)
    assert results == _one_by_one(single, batch, 2.0) == [DropReason.SESSION_EXPIRED]
    assert parse_header(client.seal_keepalive(1.0)).packet_type is PacketType.KEEPALIVE


def _client_twins(now: float = 0.0):
    return [TunnelSession(SID, SUITE, Role.CLIENT, KEYS) for _ in range(2)]


def _seal_one_by_one(session: TunnelSession, payloads: list, now: float):
    datagrams, rejected = [], []
    for payload in payloads:
        try:
            datagrams.append(session.seal(payload, now))
        except PacketRejected as refused:
            rejected.append(refused.reason)
    return datagrams, rejected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.binary(min_size=1, max_size=40), max_size=12), min_size=1, max_size=5),
    st.sampled_from(["plain", "next_pending", "next_due", "near_limit", "old_key", "closed"]),
)
def test_seal_many_is_seal_one_by_one(batches, situation):
    batched, single = _client_twins()
    now = 1.0
    for twin in (batched, single):
        if situation in ("next_pending", "next_due"):
            twin.install_next(NEXT_KEYS, 0.0)
        if situation == "next_due":
            now = 100.0  # past the promotion of unconfirmed next keys
        elif situation == "near_limit":
            twin.current.sent = REJECT_AFTER_MESSAGES - 5
        elif situation == "old_key":
            now = 1000.0  # past REJECT_AFTER_SECONDS
        elif situation == "closed":
            twin.end(SessionEnd.CLOSED)
    for payloads in batches:
        assert batched.seal_many(payloads, now) == _seal_one_by_one(single, payloads, now)
        assert _state(batched) == _state(single)
