"""The store on SQLite and on a real PostgreSQL (netlab/postgres.py): the same
behaviour on both, migrations from every older schema, allocation that several auth
services cannot race, and session changes that reach every auth service's feed."""

import asyncio
import ipaddress
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auth_service.database import Conflict, open_database
from auth_service.sessions import AddressPool, SessionManager
from auth_service.store import MIGRATIONS, Release, Renewal, Store, StoredSession
from netlab import Lab, wait_for
from netlab.auth import AuthServer, admin
from netlab.gateway import LAN_HOST, GatewayLab
from pushgate_api import auth_pb2, control_pb2

pytestmark = pytest.mark.netns  # PostgreSQL runs as another user (nobody)

NETWORK = ipaddress.ip_network("198.19.0.0/24")
GATEWAY = ipaddress.ip_address("198.19.0.1")
CIPHER = auth_pb2.CIPHER_SUITE_AES_256_GCM


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "pushgate.db")
    return request.getfixturevalue("postgres_url")


def session(session_id: int, address: str, token: bytes, now: float) -> StoredSession:
    return StoredSession.begun(session_id, token, "alice", address, CIPHER, now, now + 900)


def test_the_store_behaves_alike_on_both_databases(location):
    store = Store(location)
    now = 1764800000.123456  # a timestamp keeps its microseconds (not a 32-bit float)
    assert store.schema_version == len(MIGRATIONS)
    store.add_user("alice", "hash", now)
    assert store.get_user("alice").created_at == now
    assert store.add_members("staff", ["alice", "alice"]) == ["alice"]
    assert store.add_members("staff", ["alice"]) == []  # already a member: no error
    stored = session(0xFFFFFFF0, "198.19.0.2", b"t" * 32, now)  # ids are unsigned 32-bit
    with store.transaction():
        store.add_session(stored)
    assert store.session_by_id(0xFFFFFFF0).s2c_key == stored.s2c_key
    with pytest.raises(Conflict):  # the address is taken: another auth service lost
        store.add_session(session(7, "198.19.0.2", b"u" * 32, now))
    with pytest.raises(Conflict):  # so is the id
        store.add_session(session(0xFFFFFFF0, "198.19.0.3", b"v" * 32, now))
    store.remember_revoked(stored, 2, now)
    store.remember_revoked(stored, 3, now + 1)  # an upsert, not a second row
    assert store.revocation(b"t" * 32).cause == 3
    assert store.delete_session(0xFFFFFFF0, now + 2)
    assert store.released_addresses() == {"198.19.0.2": Release("alice", now + 2)}
    store.add_renewal(b"r" * 32, Renewal("alice", 1, "password", now, now + 60, 0))
    assert store.take_renewal(b"r" * 32) is not None
    assert store.take_renewal(b"r" * 32) is None  # used once
    first = store.lease_counter_ranges(10)
    assert store.lease_counter_ranges(5) == first + 10
    with store.transaction():
        revision = store.next_revision()
        store.log_change(revision, 9, "removed", 4)
    assert store.changes_after(revision - 1) == [(revision, 9, "removed", 4)]
    assert store.forget_changes(revision) == 1 and store.changes_after(0) == []
    store.close()


@pytest.mark.parametrize("applied", range(len(MIGRATIONS)))
def test_migrations_run_from_every_older_schema(location, applied):
    if applied:
        database = open_database(location)
        database.migrate(MIGRATIONS[:applied])
        database.close()
    store = Store(location)
    assert store.schema_version == len(MIGRATIONS)
    assert store.lease_counter_ranges(1) >= 1 and store.changes_after(0) == []
    store.close()
    store = Store(location)  # and once more: nothing left to run
    assert store.schema_version == len(MIGRATIONS)
    store.close()


def manager(location: str) -> SessionManager:
    return SessionManager(
        Store(location),
        AddressPool(NETWORK, GATEWAY, 0),
        keepalive_seconds=10,
        session_lifetime_seconds=86400,
    )


def test_two_auth_services_logging_in_at_once_never_share_an_address(postgres_url):
    """200 logins at once over two session managers (each its own store, pool and
    thread, as two hosts have): 200 distinct addresses and session ids, decided by the
    database's constraints; every change logged once, in order, without a hole."""
    Store(postgres_url).close()  # migrated once, before both start
    results: dict[str, list] = {}
    # Both start before either logs in: a manager publishes only the changes after its
    # start (earlier sessions reach its dataplane in the listing, not the feed).
    both_started = threading.Barrier(2, timeout=120)
    both_done = threading.Barrier(2, timeout=120)

    def host(name: str) -> None:
        async def logins():
            sessions = manager(postgres_url)
            both_started.wait()
            created = [
                (await sessions.create(f"{name}-{n}", CIPHER, 1000.0))[0] for n in range(100)
            ]
            both_done.wait()
            await sessions.catch_up()
            results[name] = [created, sessions.published, list(sessions.feed.events)]
            sessions.store.close()

        asyncio.run(logins())

    threads = [threading.Thread(target=host, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    created = results["a"][0] + results["b"][0]
    assert len({s.address for s in created}) == 200
    assert len({s.session_id for s in created}) == 200
    store = Store(postgres_url)
    changes = store.changes_after(0)
    assert [c[0] for c in changes] == list(range(1, 201))  # no hole, no double
    assert {c[1] for c in changes} == {s.session_id for s in created}
    for name in ("a", "b"):  # each feed holds every install, its own and the other's
        assert results[name][1] == 200
        installed = [e.installed.session_id for e in results[name][2]]
        assert sorted(installed) == sorted(c[1] for c in changes)
    store.close()


def test_a_change_on_one_auth_service_reaches_the_other_ones_feed(postgres_url):
    async def run():
        a, b = manager(postgres_url), manager(postgres_url)
        alice, _, _ = await a.create("alice", CIPHER, 1000.0)
        assert await b.catch_up() == 1
        assert b.feed.events[-1].installed.current_keys.server_to_client_key == alice.s2c_key
        await a.rekey(alice, 1100.0)
        assert await b.catch_up() == 1
        rotated = b.feed.events[-1].rotated
        assert (rotated.session_id, rotated.keys.key_epoch) == (alice.session_id, 1)
        assert rotated.keys.client_to_server_key == alice.c2s_key
        # a login and its logout before B looks: B publishes the removal only
        bob, _, _ = await a.create("bob", CIPHER, 1200.0)
        await a.remove(bob, control_pb2.REMOVAL_REASON_LOGOUT, 1201.0)
        assert await b.catch_up() == 2
        assert b.feed.events[-1].removed.session_id == bob.session_id
        assert not any(e.installed.session_id == bob.session_id for e in b.feed.events)
        # B lists what A holds, from the revision it has published
        listing = b.listing(1300.0)
        assert listing.revision == b.published == a.published
        assert [s.session_id for s in listing.sessions] == [alice.session_id]
        await b.remove(alice, control_pb2.REMOVAL_REASON_ADMIN, 1400.0)
        assert await a.catch_up() == 1
        assert a.feed.events[-1].removed.reason == control_pb2.REMOVAL_REASON_ADMIN
        a.store.close(), b.store.close()

    asyncio.run(run())


def test_an_auth_service_cut_off_longer_than_the_log_has_its_dataplane_list_again(
    postgres_url,
):
    async def run():
        a, b = manager(postgres_url), manager(postgres_url)
        generation = b.feed.generation
        carol, _, _ = await a.create("carol", CIPHER, 1000.0)
        await a.create("dave", CIPHER, 1000.0)
        assert a.forget_old_changes() == 0  # the log keeps CHANGE_LOG_KEEP changes
        assert a.store.forget_changes(a.published) == 2  # as if cut off that long
        await a.remove(carol, control_pb2.REMOVAL_REASON_LOGOUT, 1001.0)
        assert await b.catch_up() == 1  # carol's and dave's installs are not logged now
        assert not b.feed.events
        assert b.feed.generation == generation + 1  # every watch ends: list again
        assert b.feed.oldest_replayable == b.published == a.published
        a.store.close(), b.store.close()

    asyncio.run(run())


PASSWORD = "correct horse battery staple"


def test_two_real_auth_services_share_sessions_through_postgresql(tmp_path, postgres):
    """Two auth services (two gateways' worth) on one PostgreSQL: a login on A reaches
    B's session feed, a kick on A ends the session in B's feed within 1 s; while
    PostgreSQL restarts, B's feed stays up (its dataplane keeps every session), logins
    are refused UNAVAILABLE with a plain message and health says NOT_SERVING; then
    both go on. First, 200 logins at once spread over both get 200 distinct addresses."""
    # the server trusts local connections, so the password is never checked: it is
    # here to show that it reaches no log line and no error
    url = postgres.create_database("two_services").replace("pushgate@", "pushgate:dbs3cret@")
    many = {"max_sessions_per_user": "1000"}  # one user's 200 sessions, all kept
    a = AuthServer(str(tmp_path / "a"), network=str(NETWORK), database_url=url, settings=many)
    b = AuthServer(str(tmp_path / "b"), network=str(NETWORK), database_url=url, settings=many)
    a.add_user("alice", PASSWORD)  # straight into PostgreSQL: no service is up yet
    a.add_user("bob", PASSWORD)
    a.add_user("crowd", PASSWORD)
    a.start(), b.start()
    servers = (a, b)
    with ThreadPoolExecutor(16) as pool:
        crowd = list(pool.map(lambda n: servers[n % 2].login("crowd", PASSWORD), range(200)))
    assert len({login.tunnel_address for login in crowd}) == 200
    assert len({login.session_id for login in crowd}) == 200
    listed = b.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10).sessions
    assert sorted(s.session_id for s in listed) == sorted(login.session_id for login in crowd)
    events: list[tuple[float, control_pb2.SessionEvent]] = []
    feed = b.feed()
    listing = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    stream = feed.WatchSessions(control_pb2.WatchSessionsRequest(after_revision=listing.revision))

    def watch() -> None:
        try:
            for event in stream:
                events.append((time.monotonic(), event))
        except grpc.RpcError:
            pass  # cancelled at the end

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        alice = a.login("alice", PASSWORD)
        wait_for(
            lambda: any(e.installed.session_id == alice.session_id for _, e in events),
            5,
            what="alice's session in B's feed",
        )
        kicked_at = time.monotonic()
        kick = admin("session", "kick", "--user", "alice", "--config", a.config)
        assert kick.returncode == 0, kick.stderr
        removed_at = wait_for(
            lambda: next(
                (at for at, e in events if e.removed.session_id == alice.session_id), None
            ),
            5,
            what="the kick in B's feed",
        )
        assert removed_at - kicked_at < 1.0

        postgres.stop()
        with pytest.raises(grpc.RpcError) as refused:
            a.login("bob", PASSWORD)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "user database is unreachable" in refused.value.details()
        assert "dbs3cret" not in refused.value.details()
        health = health_pb2_grpc.HealthStub(b.channel())
        wait_for(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            10,
            what="B's health NOT_SERVING without its database",
        )
        assert watcher.is_alive()  # B's feed did not end: its dataplane lists nothing again
        postgres.start()
        bob = wait_for(lambda: _login(a, "bob"), 15, interval=0.5, what="a login on A again")
        wait_for(
            lambda: any(e.installed.session_id == bob.session_id for _, e in events),
            5,
            what="bob's session in B's feed",
        )
        assert watcher.is_alive()
    finally:
        stream.cancel()
        a.stop(), b.stop()
    for server in (a, b):  # the database's password never reaches a log line
        assert "dbs3cret" not in Path(server.directory, "auth.log").read_text()


def _login(server: AuthServer, user: str):
    try:
        return server.login(user, PASSWORD)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def _ping_counts(output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def test_a_tunnel_outlives_postgresql_and_its_auth_service_going_away(tmp_path, postgres):
    """A real gateway on PostgreSQL, a client pinging through it: PostgreSQL stopped
    and started again, then the auth service killed and started again; the tunnel
    carries the pings throughout and the client keeps its session (no new login)."""
    url = postgres.create_database("tunnel")
    with Lab("pgsh") as lab:
        gw = GatewayLab(lab, str(tmp_path), clients=1, keepalive_seconds=2, database_url=url)
        gw.add_user("alice")
        gw.start()
        gw.connect(0, "alice")
        wait_for(lambda: gw.status(0).get("state") == "up", 30, what="the client up")
        session = gw.status(0)["tunnel"]
        pinger = lab.start(
            gw.clients[0],
            ["ping", "-i", "0.2", "-W", "1", LAN_HOST],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1)
        postgres.stop()
        time.sleep(3)  # the auth service notices (health) while the tunnel carries on
        postgres.start()
        gw.kill(gw.auth)
        time.sleep(2)
        gw.start_auth()
        time.sleep(1)
        lab.stop(pinger, sig=signal.SIGINT)
        sent, received = _ping_counts(pinger.stdout.read())
        assert sent >= 30 and received >= sent - 1, (sent, received)
        assert gw.status(0)["tunnel"] == session  # the same session: no new login
        assert gw.status(0).get("state") == "up"
