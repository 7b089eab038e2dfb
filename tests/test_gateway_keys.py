"""Per-gateway wire keys (docs/protocol.md, "Per-gateway keys"): no (key, nonce) pair
is used by two dataplanes of a cluster, and a packet sent to one is no use at another."""

import asyncio
import contextlib
import ipaddress
import os
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from auth_service.sessions import AddressPool, SessionManager
from auth_service.store import Store
from push_protocol.aead import CipherSuite
from push_protocol.codec import parse_header
from push_protocol.drops import BadTag
from push_protocol.keys import KeyMaterial, Role, for_gateway, gateway_key
from push_protocol.session import TunnelSession

SID = 0x0A0B0C0D
gateway_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=63)


def minted(epoch: int = 0, created_at: float = 0.0) -> KeyMaterial:
    return KeyMaterial(epoch, os.urandom(32), os.urandom(32), created_at)


@given(st.binary(min_size=32, max_size=32), gateway_ids, gateway_ids)
def test_two_gateways_never_share_a_wire_key(key, first, second):
    a, b = gateway_key(key, first), gateway_key(key, second)
    assert len(a) == len(key) and a != key
    assert (a == b) == (first == second)
    assert gateway_key(key, first) == a  # both ends derive the same


def test_a_lone_gateway_uses_the_keys_as_minted():
    keys = minted()
    assert for_gateway(keys, "") is keys
    derived = for_gateway(keys, "gw-a")
    assert derived.epoch == keys.epoch and derived.created_at == keys.created_at
    assert {derived.client_to_server, derived.server_to_client}.isdisjoint(
        {keys.client_to_server, keys.server_to_client}
    )


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_dataplanes_sending_the_same_counters_seal_under_different_keys(suite):
    """Two dataplanes with the same counter range (the worst case) send counter 0,
    1, ...: each client tunnel opens its own gateway's packets and not the other's."""
    keys = minted()
    a_server = TunnelSession(SID, suite, Role.SERVER, for_gateway(keys, "gw-a"))
    b_server = TunnelSession(SID, suite, Role.SERVER, for_gateway(keys, "gw-b"))
    a_client = TunnelSession(SID, suite, Role.CLIENT, for_gateway(keys, "gw-a"))
    b_client = TunnelSession(SID, suite, Role.CLIENT, for_gateway(keys, "gw-b"))
    from_a, from_b = a_server.seal(b"same", 1.0), b_server.seal(b"same", 1.0)
    assert parse_header(from_a).counter == parse_header(from_b).counter
    assert from_a != from_b
    with pytest.raises(BadTag):
        b_client.open(from_a, 1.0)
    assert a_client.open(from_a, 1.0) == b"same" and b_client.open(from_b, 1.0) == b"same"


def test_a_packet_captured_on_its_way_to_one_gateway_is_refused_by_another():
    keys = minted()
    a_server = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, for_gateway(keys, "gw-a"))
    b_server = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.SERVER, for_gateway(keys, "gw-b"))
    client = TunnelSession(SID, CipherSuite.AES_256_GCM, Role.CLIENT, for_gateway(keys, "gw-a"))
    datagram = client.seal(b"to a", 1.0)
    with pytest.raises(BadTag):
        b_server.open(datagram, 1.0)  # replayed at gateway B
    assert a_server.open(datagram, 1.0) == b"to a"


def test_the_auth_service_feeds_its_dataplane_this_gateways_keys(tmp_path):
    """The client is given the keys as minted (login, rekey); the dataplane of gateway
    gw-a gets them as gw-a uses them, current and previous, at listing and rotation."""
    network = ipaddress.ip_network("198.18.64.0/24")
    sessions = SessionManager(
        Store(str(tmp_path / "auth.db")),
        AddressPool(network, ipaddress.ip_address("198.18.64.1"), 0),
        keepalive_seconds=10,
        session_lifetime_seconds=86400,
        gateway_id="gw-a",
    )

    async def run():
        session, *_ = await sessions.create("alice", CipherSuite.AES_256_GCM.api_code, 1000.0)
        listed = sessions.to_message(session, 1000.0).current_keys
        assert listed.client_to_server_key == gateway_key(session.c2s_key, "gw-a")
        assert listed.server_to_client_key == gateway_key(session.s2c_key, "gw-a")
        rekeyed = await sessions.rekey(session, 1001.0)
        rotation = sessions.feed.events[-1].rotated.keys
        assert rotation.client_to_server_key == gateway_key(rekeyed.c2s_key, "gw-a")
        previous = sessions.to_message(rekeyed, 1001.0).previous_keys
        assert previous.server_to_client_key == gateway_key(rekeyed.previous_s2c_key, "gw-a")
        assert rekeyed.previous_s2c_key != rekeyed.s2c_key

    asyncio.run(run())


def test_the_client_keeps_one_tunnel_per_gateway_that_follows_every_rekey():
    """client/connection.py: a gateway's tunnel made once is kept (its send counter
    goes on when the tunnel comes back to it), and catches up with the rekeys made
    while another gateway had the tunnel before it is used again (that gateway no
    longer accepts keys older than the previous epoch)."""
    from client.auth import ClientSession, Gateway
    from client.connection import Connection, ConnectOptions
    from client.core import InstallKeys

    now = [1000.0]
    connection = Connection(
        ConnectOptions(server="198.18.1.10:7443", ca_path="ca.crt", credentials=None),
        clock=lambda: now[0],
        host=object(),
    )
    gateway_a = Gateway("gw-a", None, ("198.18.1.1", 51820), 10)
    info = ClientSession(
        session_id=SID,
        token="t",
        cipher=CipherSuite.AES_256_GCM,
        keys=minted(0, now[0]),
        tunnel_address="198.19.0.2/24",
        gateway_tunnel_address="198.19.0.1",
        routes=[],
        dns_servers=[],
        mtu=1420,
        keepalive_seconds=10,
        key_lifetime_seconds=600,
        endpoint=("198.18.1.1", 51820),
        expires_at=0,
        gateways=(gateway_a,),
        gateway_id="gw-a",
    )
    connection._keys = info.keys
    tunnel = connection._tunnel_for(info, gateway_a)
    sent = parse_header(tunnel.seal(b"x", now[0])).counter
    rekeyed = []
    for epoch in (1, 2):  # while another gateway has the tunnel
        now[0] += 600
        rekeyed.append(minted(epoch, now[0]))
        connection._execute([InstallKeys(rekeyed[-1])])
    now[0] += 60
    again = connection._tunnel_for(info, gateway_a)
    assert again is tunnel and again.current.epoch == 2
    server = TunnelSession(
        SID, CipherSuite.AES_256_GCM, Role.SERVER, for_gateway(rekeyed[1], "gw-a")
    )
    assert server.open(again.seal(b"back", now[0]), now[0]) == b"back"
    assert sent == 0  # (the first keys' counter; each epoch's keys count anew)


def test_a_failed_login_tries_the_next_gateways_auth_service():
    """The server given first; after a retryable failure, in turn, the auth services
    of the gateways the last session listed; a success starts from the first again."""
    from client.auth import ClientError, Gateway
    from client.connection import Connection, ConnectOptions

    connection = Connection(
        ConnectOptions(server="198.18.1.10:7443", ca_path="ca.crt", credentials=None),
        host=object(),
    )
    connection._known_gateways = (
        Gateway("gw-a", ("198.18.1.10", 7443), ("198.18.1.1", 51820), 10),
        Gateway("gw-b", ("198.18.1.11", 7443), ("198.18.1.2", 51820), 20),
    )
    tried, outcomes = [], [ClientError("refused", retryable=True)] * 2

    async def log_in_at(host, port):
        tried.append(host)
        if outcomes:
            raise outcomes.pop()
        return SimpleNamespace(gateways=connection._known_gateways)

    connection._log_in_at = log_in_at
    for _ in range(3):
        with contextlib.suppress(ClientError):
            asyncio.run(connection._login())
    asyncio.run(connection._login())
    assert tried == ["198.18.1.10", "198.18.1.11", "198.18.1.10", "198.18.1.10"]
