"""A dataplane restart loses its replay windows and its send counters: what keeps
replay protection, endpoint pinning and nonce uniqueness intact across it
(docs/protocol.md, "Restarts"). In process, with the real auth service's session
store and feed servicer and the dataplane's real control-channel handlers; the
end-to-end versions are in tests/test_dataplane_netns.py.
"""

import asyncio
import ipaddress
import os

import pytest

from auth_service.server import SessionFeedServicer
from auth_service.sessions import AddressPool, SessionManager
from auth_service.store import Store
from dataplane.metrics import Counters
from dataplane.registry import Registry
from dataplane.sync import SessionSync
from netlab.feed import key_epoch, session
from push_protocol.aead import CipherSuite
from push_protocol.codec import PacketType, parse_header
from push_protocol.drops import DropReason, RekeyRequired, UnknownKey
from push_protocol.keys import KeyMaterial, Role
from push_protocol.session import TunnelSession
from pushgate_api import auth_pb2, control_pb2

SID = 0x0A0B0C0D


def client_for(keys: auth_pb2.SessionKeys, now: float) -> TunnelSession:
    material = KeyMaterial(
        keys.key_epoch, keys.client_to_server_key, keys.server_to_client_key, now
    )
    return TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, material)


def incarnation(listing: control_pb2.ListSessionsResponse, now: float) -> Registry:
    """A freshly started dataplane that has just listed the sessions."""
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: now)
    sync.counter_ranges.add(listing.counter_ranges)
    sync.reconcile(listing)
    return registry


def listing_of(*sessions: control_pb2.Session) -> control_pb2.ListSessionsResponse:
    return control_pb2.ListSessionsResponse(
        sessions=sessions, revision=1, counter_ranges=control_pb2.CounterRanges(first=1, count=8)
    )


def test_packets_captured_before_a_restart_are_never_delivered_after_it():
    keys = key_epoch(0, 1000.0)
    client = client_for(keys, 1000.0)
    # Before the restart, the keys came from a watch event: fresh, data flows.
    first = TunnelSession(
        SID,
        CipherSuite.AES_256_GCM,
        Role.SERVER,
        KeyMaterial(0, keys.client_to_server_key, keys.server_to_client_key, 1000.0),
        counter_range=1,
    )
    captured = [client.seal(b"packet %d" % n, 1001.0) for n in range(3)]
    assert [first.open(d, 1001.0) for d in captured] == [b"packet 0", b"packet 1", b"packet 2"]

    # After the restart the same keys come from a listing: the replayed packets
    # authenticate but are refused, move nothing, and each is refused once.
    after = incarnation(listing_of(session(SID, "198.19.0.2", keys)), 1002.0).by_id[SID].tunnel
    for datagram in captured:
        with pytest.raises(RekeyRequired):
            after.open(datagram, 1002.0)
        assert not after.advanced  # no endpoint may follow it
        assert after.last_received_at is None
    results = after.open_many(captured, [parse_header(d) for d in captured], 1002.0)
    assert results == [DropReason.REPLAY] * 3
    assert not after.advanced

    # The client is asked to rekey, once a second, under the same keys ...
    client_address, replayer = ("198.18.0.2", 4000), ("198.18.0.66", 4000)
    request = after.rekey_request(0, client_address, 1002.0)
    assert after.rekey_request(0, client_address, 1002.5) is None
    # replays from elsewhere do not use up the client's answers
    assert after.rekey_request(0, replayer, 1002.6) is not None
    assert after.rekey_request(0, client_address, 1002.7) is not None
    header = parse_header(request, True)
    assert header.packet_type is PacketType.REKEY_REQUIRED
    assert client.open(request, 1002.0, header) == b""
    assert client.needs_rekey(1002.0)
    # ... and new keys from the auth service (a watch event: fresh) carry data at once.
    new = key_epoch(1, 1002.1)
    material = KeyMaterial(1, new.client_to_server_key, new.server_to_client_key, 1002.1)
    after.install_next(material, 1002.1, counter_range=2)
    client.install_next(material, 1002.1)
    assert not client.needs_rekey(1002.1)
    datagram = client.seal(b"after the rekey", 1002.1)
    assert parse_header(datagram).key_epoch == 1  # promoted at once: the dataplane asked
    assert after.open(datagram, 1002.2) == b"after the rekey"
    assert after.advanced


def test_relisted_previous_keys_get_only_the_grace_the_auth_service_recorded():
    old, new = key_epoch(0, 1000.0), key_epoch(1, 1090.0)
    client = client_for(old, 1000.0)
    sess = session(SID, "198.19.0.2", new)
    sess.previous_keys.CopyFrom(old)
    sess.previous_keys_until_unix_ms = 1095_000  # the rekey at 1090 gave 5 s
    tunnel = incarnation(listing_of(sess), 1094.0).by_id[SID].tunnel
    with pytest.raises(RekeyRequired):  # within the grace: authentic, not delivered
        tunnel.open(client.seal(b"in flight", 1094.0), 1094.0)
    with pytest.raises(UnknownKey):  # after it: gone, not 30 s from the restart
        tunnel.open(client.seal(b"late", 1096.0), 1096.0)


def test_keys_created_in_the_future_are_refused():
    counters = Counters()
    registry = Registry()
    sync = SessionSync(registry, counters, "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=8))
    sync.apply(
        control_pb2.SessionEvent(
            revision=1, installed=session(SID, "198.19.0.2", key_epoch(0, 1060.0))
        )
    )
    assert SID not in registry.by_id
    assert counters.keys_refused == 1
    sync.apply(  # a few seconds ahead is the same host's clocks being read apart
        control_pb2.SessionEvent(
            revision=2, installed=session(SID, "198.19.0.2", key_epoch(0, 1001.0))
        )
    )
    assert SID in registry.by_id


def test_no_nonce_is_used_twice_when_the_clock_steps_back_across_a_restart(tmp_path):
    """Two incarnations of the dataplane seal under the same re-learned key; the
    second starts after an NTP step put the clock back to when the first started."""

    async def scenario():
        manager = SessionManager(
            Store(str(tmp_path / "auth.db")),
            AddressPool(ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_address("198.19.0.1")),
            keepalive_seconds=10,
            session_lifetime_seconds=86400,
        )
        created, _, _ = await manager.create("alice", auth_pb2.CIPHER_SUITE_AES_256_GCM, 1000.0)
        feed = SessionFeedServicer(manager, on_change=lambda: None)
        nonces = []
        for now in (1010.0, 1010.0):  # each incarnation lists the sessions, as at start-up
            listing = await feed.ListSessions(control_pb2.ListSessionsRequest(), None)
            tunnel = incarnation(listing, now).by_id[created.session_id].tunnel
            for _ in range(3):
                nonces.append(parse_header(tunnel.seal_keepalive(now)).counter)
        assert len(set(nonces)) == len(nonces), nonces

    asyncio.run(scenario())


def test_only_a_counter_above_all_seen_moves_the_endpoint():
    keys = KeyMaterial(0, os.urandom(32), os.urandom(32), 0.0)
    client = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, keys)
    server = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, keys, counter_range=1)
    early, late = client.seal(b"early", 1.0), client.seal(b"late", 1.0)
    assert server.open(late, 1.0) == b"late"
    assert server.advanced
    assert server.open(early, 1.0) == b"early"  # authentic, in the window: delivered ...
    assert not server.advanced  # ... but it may come from anywhere: it moves nothing
    batch = [client.seal(b"%d" % n, 1.0) for n in range(3)]
    ordered = [batch[2], batch[0], batch[1]]
    server.open_many(ordered[:1], [parse_header(ordered[0])], 1.0)
    assert server.advanced
    server.open_many(ordered[1:], [parse_header(d) for d in ordered[1:]], 1.0)
    assert not server.advanced
