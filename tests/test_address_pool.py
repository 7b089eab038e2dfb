"""Tunnel addresses: a freed address is not handed straight to the next user, and a user
gets their previous address back (auth_service/sessions.py AddressPool, the store's
released_addresses, a real auth service over gRPC/TLS across a restart)."""

import asyncio
import contextlib
import ipaddress
import os
import sqlite3
import tempfile
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth_service.sessions import AddressPool, AllocationKind, PoolExhausted, SessionManager
from auth_service.store import MIGRATIONS, Release, Store
from netlab.auth import AuthServer
from pushgate_api import auth_pb2, control_pb2
from pushgate_io import gateway_config

NETWORK = ipaddress.ip_network("198.19.0.0/29")  # hosts .1-.6; .1 is the gateway's
GATEWAY = ipaddress.ip_address("198.19.0.1")
PASSWORD = "correct horse battery staple"


def pool(quarantine: float = 180) -> AddressPool:
    return AddressPool(NETWORK, GATEWAY, quarantine)


# -- the decisions (pure) ------------------------------------------------------------


def test_a_user_gets_their_previous_address_back_when_it_is_free():
    released = {
        "198.19.0.4": Release("alice", 100.0),
        "198.19.0.5": Release("alice", 200.0),  # her last
        "198.19.0.6": Release("bob", 300.0),
    }
    assert pool().allocate("alice", set(), released, 1000.0) == (
        "198.19.0.5",
        AllocationKind.PREVIOUS,
    )
    # taken by someone else meanwhile: her older one, still hers
    assert pool().allocate("alice", {"198.19.0.5"}, released, 1000.0) == (
        "198.19.0.4",
        AllocationKind.PREVIOUS,
    )
    # sticky whatever the quarantine says: the NAT state is her own
    assert pool().allocate("bob", set(), released, 301.0) == ("198.19.0.6", AllocationKind.PREVIOUS)


def test_another_users_freed_address_waits_out_the_quarantine():
    released = {"198.19.0.2": Release("alice", 1000.0)}
    # an address nobody held comes first, lowest first
    assert pool().allocate("bob", set(), released, 1001.0) == ("198.19.0.3", AllocationKind.UNUSED)
    everything_else = {"198.19.0.3", "198.19.0.4", "198.19.0.5", "198.19.0.6"}
    # then alice's, once the quarantine is over ...
    assert pool().allocate("bob", everything_else, released, 1180.0) == (
        "198.19.0.2",
        AllocationKind.RELEASED,
    )
    # ... or before, when nothing else is free: a login is not refused (and counted)
    assert pool().allocate("bob", everything_else, released, 1179.0) == (
        "198.19.0.2",
        AllocationKind.QUARANTINED,
    )
    assert pool(quarantine=0).allocate("bob", everything_else, released, 1000.0)[1] == (
        AllocationKind.RELEASED
    )


def test_freed_addresses_go_out_oldest_first_once_every_address_was_held():
    released = {
        "198.19.0.2": Release("alice", 500.0),
        "198.19.0.3": Release("bob", 100.0),  # freed longest ago
        "198.19.0.4": Release("carol", 300.0),
        "198.19.0.5": Release("dave", 900.0),
        "198.19.0.6": Release("erin", 950.0),
    }
    assert pool().allocate("frank", set(), released, 1000.0) == (
        "198.19.0.3",
        AllocationKind.RELEASED,
    )
    assert pool().allocate("frank", {"198.19.0.3"}, released, 1000.0) == (
        "198.19.0.4",
        AllocationKind.RELEASED,
    )
    live = {"198.19.0.2", "198.19.0.3", "198.19.0.4"}
    assert pool().allocate("frank", live, released, 1000.0) == (
        "198.19.0.5",
        AllocationKind.QUARANTINED,
    )


def test_a_full_pool_is_exhausted_whatever_was_released():
    live = {f"198.19.0.{n}" for n in range(2, 7)}
    released = {"198.19.0.2": Release("alice", 1.0)}
    with pytest.raises(PoolExhausted, match=r"no free tunnel address in 198\.19\.0\.0/29"):
        pool().allocate("alice", live, released, 1000.0)


@pytest.mark.parametrize(
    "network",
    ["198.19.0.0/29", "198.19.0.0/30", "198.19.0.0/31", "2001:db8::/125", "2001:db8::/127"],
)
def test_the_pool_holds_exactly_the_hosts_it_hands_out(network):
    network = ipaddress.ip_network(network)
    gateway = next(network.hosts())
    addresses = AddressPool(network, gateway)
    hosts = {str(host) for host in network.hosts()} - {str(gateway)}
    assert {str(a) for a in network if str(a) in addresses} == hosts
    assert addresses.size == len(hosts)
    assert "198.18.0.1" not in addresses and "not an address" not in addresses


@pytest.mark.parametrize(
    "network",
    [
        "198.19.0.0/24",
        "198.19.0.0/29",
        "198.19.0.0/31",
        "198.19.0.7/32",
        "2001:db8::/120",
        "2001:db8::/127",
        "2001:db8::/128",
    ],
)
def test_the_candidates_are_network_hosts_less_the_gateway_lowest_first(network):
    """The pool counts hosts as integers (fast); it yields what `hosts()` yields."""
    network = ipaddress.ip_network(network)
    hosts = list(network.hosts())
    for gateway in (hosts[0], hosts[-1], network.network_address):
        pool = AddressPool(network, gateway)
        expected = [str(host) for host in hosts if host != gateway]
        assert list(pool._candidates()) == expected
        assert pool.size == len(expected)


# -- the store and the session manager -----------------------------------------------


def manager(path: str, quarantine: float = 180, network=NETWORK) -> SessionManager:
    return SessionManager(
        Store(path),
        AddressPool(network, GATEWAY, quarantine),
        keepalive_seconds=10,
        session_lifetime_seconds=86400,
    )


def test_released_addresses_survive_a_restart_and_stale_ones_are_forgotten(tmp_path):
    path = str(tmp_path / "pushgate.db")
    cipher = auth_pb2.CIPHER_SUITE_AES_256_GCM

    async def before_the_restart():
        sessions = manager(path)
        alice, _, _ = await sessions.create("alice", cipher, 100.0)
        bob, _, _ = await sessions.create("bob", cipher, 100.0)
        assert (alice.address, bob.address) == ("198.19.0.2", "198.19.0.3")
        await sessions.remove(alice, control_pb2.REMOVAL_REASON_LOGOUT, 200.0)
        await sessions.expire(100.0 + 901)  # bob's keys were never replaced
        assert sessions.store.released_addresses() == {
            "198.19.0.2": Release("alice", 200.0),
            "198.19.0.3": Release("bob", 1001.0),
        }
        sessions.store.close()

    async def after_the_restart():
        sessions = manager(path)
        bob, _, _ = await sessions.create("bob", cipher, 1100.0)
        alice, _, _ = await sessions.create("alice", cipher, 1100.0)
        carol, _, _ = await sessions.create("carol", cipher, 1100.0)
        assert (alice.address, bob.address, carol.address) == (
            "198.19.0.2",
            "198.19.0.3",
            "198.19.0.4",
        )
        sessions.store.close()
        # the tunnel network changes: records of addresses it no longer has are dropped
        smaller = manager(path, network=ipaddress.ip_network("198.19.0.0/30"))
        assert smaller.store.released_addresses() == {"198.19.0.2": Release("alice", 200.0)}
        smaller.store.close()

    asyncio.run(before_the_restart())
    asyncio.run(after_the_restart())


def test_an_existing_database_gains_the_released_addresses_table(tmp_path):
    path = str(tmp_path / "old.db")
    with contextlib.closing(sqlite3.connect(path)) as db:  # as the first schema left it
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.executescript(
            "BEGIN;" + MIGRATIONS[0] + "INSERT INTO meta VALUES ('schema_version', '1'); COMMIT;"
        )
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS) >= 2
    assert store.released_addresses() == {}
    store.close()


def test_the_quarantine_is_configured_in_the_auth_section(tmp_path):
    path = tmp_path / "pushgate.toml"
    base = (
        '[gateway]\ntunnel_network = "198.19.0.0/29"\ngateway_address = "198.19.0.1"\n'
        '[auth]\ndataplane_endpoint = "198.18.0.1:51820"\n'
    )
    path.write_text(base)
    assert gateway_config.load(str(path), auth=True).auth.address_quarantine_seconds == 180
    path.write_text(base + "address_quarantine_seconds = 0\n")
    assert gateway_config.load(str(path), auth=True).auth.address_quarantine_seconds == 0
    path.write_text(base + "address_quarantine_seconds = -1\n")
    with pytest.raises(gateway_config.ConfigError, match="address_quarantine_seconds: -1"):
        gateway_config.load(str(path), auth=True)


# -- a real auth service ---------------------------------------------------------------


@pytest.mark.processes
def test_logins_get_sticky_addresses_and_quarantine_from_a_real_auth_service(tmp_path):
    server = AuthServer(str(tmp_path / "gw"), network=str(NETWORK))
    written = gateway_config.load(server.config, auth=True).auth  # as `init` wrote it
    assert written.address_quarantine_seconds == 180
    for user in ("alice", "bob", "carol"):
        server.add_user(user, PASSWORD)
    server.start()
    try:

        def login(user: str) -> auth_pb2.LoginResponse:
            return server.login(user, PASSWORD)

        def logout(response: auth_pb2.LoginResponse) -> None:
            request = auth_pb2.LogoutRequest(session_token=response.session_token)
            server.stub().Logout(request, timeout=10)

        alice, bob = login("alice"), login("bob")
        assert (alice.tunnel_address, bob.tunnel_address) == ("198.19.0.2/29", "198.19.0.3/29")
        logout(alice)
        logout(bob)
        assert login("carol").tunnel_address == "198.19.0.4/29"  # not alice's, freed just now
        server.stop()
        server.start()  # what was freed, and by whom, is in the store
        assert login("bob").tunnel_address == "198.19.0.3/29"  # his own again
        assert login("alice").tunnel_address == "198.19.0.2/29"
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert 'pushgate_auth_address_allocations_total{kind="previous"} 2.0' in metrics
        assert 'pushgate_auth_address_allocations_total{kind="quarantined"} 0.0' in metrics
    finally:
        server.stop()


class _Rollback(Exception):
    pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["login", "logout"]), st.integers(0, 15), st.integers(0, 200)),
        min_size=1,
        max_size=50,
    )
)
def test_the_stores_indexed_allocation_gives_the_rules_answer(steps):
    """Whatever happened before (logins, logouts, time passing, the pool running out),
    `SessionManager._allocate` (indexed lookups and a mark) answers exactly as
    `AddressPool.allocate` (the rule, on whole sets)."""
    network = ipaddress.ip_network("198.19.0.0/29")  # 5 addresses: it runs out
    with tempfile.TemporaryDirectory() as directory:
        sessions = SessionManager(
            Store(os.path.join(directory, "db")),
            AddressPool(network, ipaddress.ip_address("198.19.0.5"), 180),
            keepalive_seconds=10,
            session_lifetime_seconds=86400,
            max_sessions_per_user=1000,
        )
        store, live, now = sessions.store, [], 1000.0

        async def run():
            nonlocal now
            for action, user, pause in steps:
                now += pause
                if action == "logout" and live:
                    session = live.pop(user % len(live))
                    await sessions.remove(session, control_pb2.REMOVAL_REASON_LOGOUT, now)
                    continue
                name = f"user{user}"
                answers = []
                for allocate in ("rule", "store"):
                    try:
                        with store.transaction():
                            if allocate == "rule":
                                used, released = store.used_addresses(), store.released_addresses()
                                answers.append(sessions.pool.allocate(name, used, released, now))
                            else:
                                answers.append(sessions._allocate(name, now))
                            raise _Rollback
                    except _Rollback:
                        pass
                    except PoolExhausted:
                        answers.append("exhausted")
                assert answers[0] == answers[1]
                if answers[0] != "exhausted":
                    live.append(
                        (await sessions.create(name, auth_pb2.CIPHER_SUITE_AES_256_GCM, now))[0]
                    )
            store.close()

        asyncio.run(run())
