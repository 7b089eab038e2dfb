"""The auth service: real gRPC over TLS, real Unix socket, real SQLite."""

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auth_service.pki import make_ca, make_server_cert
from auth_service.throttle import Limits, Outcome, SprayWatch, Throttle, login_keys
from client.auth import AuthClient, ClientError, SessionGone
from netlab import Lab, metrics, refuses_nobody, wait_for
from netlab.auth import BIN, AuthServer, admin
from pushgate_api import auth_pb2, auth_pb2_grpc, control_pb2
from pushgate_io.rate_limited_log import RateLimitedLog

PASSWORD = "correct horse battery staple"


@pytest.fixture
def auth(tmp_path):
    server = AuthServer(
        str(tmp_path / "gw"),
        settings={
            "max_failures_before_delay": "3",
            "failure_delay_seconds": "1.0",
            "max_failure_delay_seconds": "2.0",
            "max_sessions_per_user": "100",  # tests below log alice in many times
        },
    )
    server.add_user("alice", PASSWORD)
    server.start()
    yield server
    server.stop()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


@pytest.mark.processes
def test_good_login_returns_a_complete_session(auth):
    response = auth.login("alice", PASSWORD)
    assert response.session_id != 0
    assert len(response.session_token) >= 32
    keys = response.keys
    assert len(keys.client_to_server_key) == len(keys.server_to_client_key) == 32
    assert keys.client_to_server_key != keys.server_to_client_key
    assert response.cipher == auth_pb2.CIPHER_SUITE_AES_256_GCM
    assert ipaddress.ip_interface(response.tunnel_address) == ipaddress.ip_interface(
        "198.19.0.2/24"
    )
    assert response.gateway_tunnel_address == "198.19.0.1"
    assert list(response.network.routes) == ["0.0.0.0/0"]
    assert response.mtu == 1420 and response.keepalive_seconds == 10
    assert response.key_lifetime_seconds == 600
    assert (response.dataplane_endpoint.host, response.dataplane_endpoint.port) == (
        "198.18.0.1",
        51820,
    )
    assert response.expires_at_unix_ms > time.time() * 1000
    assert PASSWORD not in Path(auth.directory, "auth.log").read_text()


@pytest.mark.processes
def test_wrong_password_unknown_and_disabled_users_get_the_same_answer(auth):
    auth.add_user("bob", PASSWORD)
    assert admin("user", "disable", "bob", "--config", auth.config).returncode == 0
    answers = {
        _code(lambda u=user, p=password: auth.login(u, p))
        for user, password in [("alice", "wrong"), ("nobody-here", PASSWORD), ("bob", PASSWORD)]
    }
    assert answers == {(grpc.StatusCode.UNAUTHENTICATED, "invalid user name or password")}
    assert admin("user", "enable", "bob", "--config", auth.config).returncode == 0
    assert auth.login("bob", PASSWORD).session_id


@pytest.mark.processes
def test_throttling_kicks_in_and_lifts(auth):
    for _ in range(3):
        assert _code(lambda: auth.login("alice", "wrong"))[0] is grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: auth.login("alice", "wrong"))[0] is grpc.StatusCode.UNAUTHENTICATED
    code, details = _code(lambda: auth.login("alice", PASSWORD))  # even the right password
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "try again" in details
    time.sleep(2.1)  # the configured maximum delay: the lock never lasts longer
    assert auth.login("alice", PASSWORD).session_id


@pytest.mark.processes
def test_60_concurrent_wrong_guesses_reach_the_hash_only_as_often_as_allowed(auth):
    """Today's service checked the throttle before hashing and counted the failure
    after: all 60 concurrent guesses were password-checked. With 3 free failures
    (the fixture) only 4 may be."""
    # Four connections of 15 calls each: under the server's 32 streams per connection
    # (more are refused there, before any throttle, as UNAVAILABLE).
    credentials = grpc.ssl_channel_credentials(root_certificates=auth.ca)
    stubs = []
    for _ in range(4):
        channel = grpc.secure_channel(
            f"localhost:{auth.port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        auth.channels.append(channel)
        stubs.append(auth_pb2_grpc.AuthStub(channel))
    request = auth_pb2.LoginRequest(username="alice", password="wrong")
    with ThreadPoolExecutor(60) as pool:
        codes = list(
            pool.map(lambda n: _code(lambda: stubs[n % 4].Login(request, timeout=30))[0], range(60))
        )
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 4
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 56
    samples = metrics.parse(auth.metrics_text())
    assert metrics.total(samples, "pushgate_auth_password_checks_total") == 4
    assert metrics.total(samples, "pushgate_auth_logins_total", result="throttled") == 56


@pytest.mark.netns
def test_guessing_and_spraying_from_elsewhere_lock_nobody_out(tmp_path):
    """From mallory's namespace: guesses at alice from four addresses and a spray over
    30 user names from a fifth. Each is slowed where it comes from; alice, from her
    own address, logs in at once (today's per-account throttle refused her), and
    the spray across sources shows as a targeted account in the metrics."""
    with Lab("pgthr") as lab:
        gw, home, attacker = (lab.namespace(name) for name in ("gw", "alice", "mallory"))
        lab.link(gw, "198.18.1.1/24", home, "198.18.1.2/24")
        _, mallory_dev = lab.link(gw, "198.18.2.1/24", attacker, "198.18.2.2/24")
        for host in range(3, 7):
            lab.exec(attacker, ["ip", "address", "add", f"198.18.2.{host}/24", "dev", mallory_dev])
        server = AuthServer(
            str(tmp_path / "gw"),
            lab=lab,
            namespace=gw,
            server_names=("198.18.1.1", "198.18.2.1"),
            settings={"spray_alert_sources": "4"},
        )
        server.add_user("alice", PASSWORD)
        server.start()
        try:
            ca = str(Path(server.directory, "tls", "ca.crt"))

            def churn(ns, *args):
                argv = [sys.executable, "-m", "netlab.churn", *args]
                return json.loads(lab.exec(ns, argv, timeout=120).stdout)["outcomes"]

            mallory = f"198.18.2.1:{server.port}"
            for host in range(2, 6):  # alice's password guessed from four addresses
                route = ["ip", "route", "replace", "198.18.2.1/32", "dev", mallory_dev]
                lab.exec(attacker, [*route, "src", f"198.18.2.{host}"])
                guessed = churn(attacker, "guess", mallory, ca, "alice", "12")
                assert guessed == {"UNAUTHENTICATED": 6, "RESOURCE_EXHAUSTED": 6}, host
            lab.exec(attacker, [*route, "src", "198.18.2.6"])
            names = ",".join(f"user{n}" for n in range(30))  # the spray: 21 get checked
            sprayed = churn(attacker, "guess", mallory, ca, names, "30")
            assert sprayed == {"UNAUTHENTICATED": 21, "RESOURCE_EXHAUSTED": 9}
            password_file = tmp_path / "password"
            password_file.write_text(PASSWORD + "\n")
            target = f"198.18.1.1:{server.port}"
            assert churn(home, "churn", target, ca, "alice", str(password_file), "1", "1") == {
                "OK": 1
            }

            def targeted():  # the sweep sets the gauge within a second
                samples = metrics.parse(server.metrics_text())
                return (
                    samples if metrics.total(samples, "pushgate_auth_accounts_targeted") else None
                )

            samples = wait_for(targeted, timeout=10, what="alice counted as a targeted account")
            assert metrics.total(samples, "pushgate_auth_accounts_targeted") == 1
            assert metrics.total(samples, "pushgate_auth_password_checks_total") == 4 * 6 + 21 + 1
            assert metrics.total(samples, "pushgate_auth_logins_total", result="success") == 1
        finally:
            server.stop()


def _failed(throttle, keys, now):
    assert throttle.begin(keys, now).go
    throttle.finish(keys, now, Outcome.FAILED)


def _guess(throttle, keys, now) -> bool:
    """A wrong password, if the throttle lets it be checked; whether it was."""
    if not throttle.begin(keys, now).go:
        return False
    throttle.finish(keys, now, Outcome.FAILED)
    return True


def test_throttle_model():
    throttle = Throttle(Limits(account_source=2), base_delay=1.0, max_delay=4.0, max_records=100)
    keys = login_keys("alice", "198.18.7.7")
    for now in (0.0, 0.1):
        _failed(throttle, keys, now)
        assert throttle.begin(keys, now).go
        throttle.finish(keys, now, Outcome.ABANDONED)  # an abandoned check counts nothing
    delays = []
    now = 0.2
    for _ in range(5):
        _failed(throttle, keys, now)
        delays.append(throttle.begin(keys, now).retry_after)
        now += delays[-1]
    assert delays == pytest.approx([1.0, 2.0, 4.0, 4.0, 4.0])
    assert throttle.begin(keys, now + 4.1).go  # forgotten after a quiet period
    throttle.finish(keys, now + 4.1, Outcome.SUCCEEDED)
    assert len(throttle) == 0
    # A success clears the account's record from that source, not the source's own.
    _failed(throttle, keys, 100.0)
    assert throttle.begin(keys, 100.0).go
    throttle.finish(keys, 100.0, Outcome.SUCCEEDED)
    assert len(throttle) == 2 and throttle.begin(keys, 100.0).go  # the address and its /24


def test_a_correct_password_from_a_source_that_has_not_failed_is_never_refused():
    """Today's throttle refused the account everywhere after 5 failures from anywhere."""
    throttle = Throttle(Limits(), base_delay=1.0, max_delay=300.0, max_records=10000)
    now = 0.0
    # Guessing alice from two IPv4 addresses and an IPv6 /64; spraying her whole /24.
    for attacker in ("198.18.5.66", "198.18.9.9", "2001:db8:1:2::66"):
        checked = sum(_guess(throttle, login_keys("alice", attacker), now) for _ in range(50))
        assert checked == 6
    for host in range(100, 250):
        _guess(throttle, login_keys(f"user{host}", f"198.18.5.{host}"), now)
    assert throttle.begin(login_keys("alice", "198.18.5.66"), now).retry_after > 0
    assert throttle.begin(login_keys("bob", "198.18.5.66"), now).retry_after > 0  # a spray
    assert throttle.begin(login_keys("alice", "198.18.5.120"), now).retry_after > 0  # its /24
    # alice from her own address, from the attacker's /24 and from another host of the
    # attacker's IPv6 /64's neighbour /64: none of them has failed, none is refused.
    for own in ("198.18.6.1", "198.18.5.7", "2001:db8:1:3::1"):
        keys = login_keys("alice", own)
        assert throttle.begin(keys, now).go, own
        throttle.finish(keys, now, Outcome.SUCCEEDED)
    # The same /64 is the same source: an IPv6 attacker cannot hop addresses in it.
    assert throttle.begin(login_keys("alice", "2001:db8:1:2::99"), now).retry_after > 0


def test_a_spray_across_users_from_one_source_is_slowed():
    throttle = Throttle(Limits(source=20), base_delay=1.0, max_delay=300.0, max_records=1000)
    for n in range(21):  # every name only once: no account_source key ever blocks
        _failed(throttle, login_keys(f"user{n}", "198.18.3.3"), 0.0)
    assert throttle.begin(login_keys("someone-new", "198.18.3.3"), 0.0).retry_after == 1.0
    assert throttle.begin(login_keys("someone-new", "198.18.3.4"), 0.0).go  # neighbour


def test_concurrent_guesses_reach_the_hash_at_most_free_plus_one_times():
    """Today's throttle checked, then hashed, then counted: 60 concurrent guesses all
    reached the hash. Now an attempt is counted when it starts."""
    throttle = Throttle(Limits(account_source=5), base_delay=1.0, max_delay=300.0, max_records=99)
    keys = login_keys("alice", "198.18.3.3")
    verdicts = [throttle.begin(keys, 0.0) for _ in range(60)]
    assert [v.go for v in verdicts].count(True) == 6
    assert all(v.wait for v in verdicts[6:])  # not refused: they wait for those in flight
    for _ in range(6):
        throttle.finish(keys, 0.1, Outcome.FAILED)
    assert all(throttle.begin(keys, 0.1).retry_after == pytest.approx(1.0) for _ in range(54))
    # Concurrent correct logins only queue: each success lets the next one start.
    other = login_keys("bob", "198.18.3.9")
    waiting, in_flight = 20, 0
    while waiting:
        while waiting and (verdict := throttle.begin(other, 0.0)).go:
            waiting, in_flight = waiting - 1, in_flight + 1
        assert verdict.retry_after == 0.0  # waits, never refused
        throttle.finish(other, 0.0, Outcome.SUCCEEDED)
        in_flight -= 1
    for _ in range(in_flight):
        throttle.finish(other, 0.0, Outcome.SUCCEEDED)
    assert len(throttle) == 3  # alice's records (pair, address, /24); bob left none


def test_throttle_spray_watch_and_failure_log_stay_bounded():
    throttle = Throttle(Limits(), base_delay=1.0, max_delay=300.0, max_records=1000)
    watch = SprayWatch(sources=3, window=900.0)
    now = 0.0
    failure_log = RateLimitedLog(logging.getLogger("test"), 10.0, max_keys=50, clock=lambda: now)
    held = login_keys("mallory", "198.18.0.9")
    assert throttle.begin(held, 0.0).go  # in flight: never evicted
    for n in range(20000):  # distinct names and sources, as fast as can be
        now = n * 0.001
        address = f"198.{18 + n % 2}.{n // 256 % 256}.{n % 256}"
        _failed(throttle, login_keys(f"u{n}", address), now)
        watch.failed("alice", address, now)
        failure_log.warning(f"u{n}", "login failed user=%r", f"u{n}")
        assert len(throttle) <= 1000 and len(failure_log) <= 50
    assert throttle.evicted > 0
    throttle.finish(held, 20.0, Outcome.FAILED)
    assert len(watch) == 1 and watch.targeted(20.0) == 1
    throttle.prune(20.0 + 301)
    now = 20.0 + 10
    failure_log.prune()
    assert len(throttle) == len(failure_log) == 0
    assert watch.targeted(20.0 + 901) == 0 and len(watch) == 0


def test_spray_watch_counts_accounts_failing_from_many_sources():
    watch = SprayWatch(sources=3, window=900.0)
    for source in ("198.18.1.1", "198.18.1.1", "2001:db8::1", "2001:db8::2"):
        watch.failed("alice", source, 0.0)  # one IPv4 source and one /64: two sources
    assert watch.targeted(1.0) == 0
    watch.failed("alice", "198.18.9.9", 500.0)
    assert watch.targeted(500.0) == 1
    assert watch.targeted(901.0) == 0  # the first two fell out of the window


@pytest.mark.processes
def test_malformed_requests_get_invalid_argument(auth):
    stub = auth.stub()
    for request in (
        auth_pb2.LoginRequest(username="", password="x"),
        auth_pb2.LoginRequest(username="a" * 300, password="x"),
        auth_pb2.LoginRequest(username="alice", password=""),
        auth_pb2.LoginRequest(username="al\x00ice", password="x"),
        auth_pb2.LoginRequest(username="alice", password="p" * 2000),
    ):
        assert _code(lambda r=request: stub.Login(r, timeout=10))[0] is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    raw = auth.channel().unary_unary(
        "/pushgate.auth.v1.Auth/Login",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    not_utf8 = b"\x0a\x02\xff\xfe\x12\x01x"  # username = b"\xff\xfe"
    assert _code(lambda: raw(not_utf8, timeout=10))[0] is grpc.StatusCode.INVALID_ARGUMENT
    huge = b"\x0a" + b"\xff\xff\x04" + b"a" * 0x10000 * 1
    assert _code(lambda: raw(huge[:70000], timeout=10))[0] is (grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert auth.login("alice", PASSWORD).session_id  # and the service is fine


@pytest.mark.processes
def test_100_concurrent_logins_get_100_distinct_addresses(auth):
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: auth.login("alice", PASSWORD), range(100)))
    addresses = {r.tunnel_address for r in responses}
    assert len(addresses) == 100
    assert "198.19.0.1/24" not in addresses  # the gateway's own
    assert len({r.session_id for r in responses}) == 100


@pytest.mark.processes
def test_pool_exhaustion_is_a_clear_error(tmp_path):
    server = AuthServer(
        str(tmp_path / "small"), network="198.19.0.0/29", settings={"max_sessions_per_user": "10"}
    )
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        tokens = [server.login("alice", PASSWORD).session_token for _ in range(5)]
        code, details = _code(lambda: server.login("alice", PASSWORD))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free tunnel address" in details
        server.stub().Logout(auth_pb2.LogoutRequest(session_token=tokens[2]), timeout=10)
        assert server.login("alice", PASSWORD).tunnel_address == "198.19.0.4/29"  # released
    finally:
        server.stop()


@pytest.mark.processes
def test_rekey_then_logout(auth):
    stub = auth.stub()
    login = auth.login("alice", PASSWORD)
    rekey = stub.Rekey(auth_pb2.RekeyRequest(session_token=login.session_token), timeout=10)
    assert rekey.keys.key_epoch == 1
    assert rekey.keys.client_to_server_key != login.keys.client_to_server_key
    info = stub.SessionInfo(
        auth_pb2.SessionInfoRequest(session_token=login.session_token), timeout=10
    )
    assert (info.session_id, info.key_epoch, info.username) == (login.session_id, 1, "alice")
    stub.Logout(auth_pb2.LogoutRequest(session_token=login.session_token), timeout=10)
    for call in (stub.SessionInfo, stub.Rekey, stub.Logout):
        request_type = {
            stub.SessionInfo: auth_pb2.SessionInfoRequest,
            stub.Rekey: auth_pb2.RekeyRequest,
            stub.Logout: auth_pb2.LogoutRequest,
        }[call]
        assert _code(
            lambda c=call, t=request_type: c(t(session_token=login.session_token), timeout=10)
        )[0] is (grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.processes
def test_the_client_reads_a_refused_session_call_as_session_gone(auth):
    """For a login, UNAUTHENTICATED means bad credentials; for a call with a
    session token it means the session is gone, which only a new login mends
    (the client's connection logs in again at once instead of retrying a rekey)."""

    async def scenario():
        client = AuthClient(f"localhost:{auth.port}", str(Path(auth.directory, "tls", "ca.crt")))
        try:
            with pytest.raises(ClientError, match="login refused: wrong user name or password"):
                await client.login("alice", "wrong")
            session = await client.login("alice", PASSWORD)
            assert await client.session_alive(session.token)
            await client.rekey(session.token)
            await client.logout(session.token)
            assert not await client.session_alive(session.token)
            with pytest.raises(SessionGone, match="no longer knows this session"):
                await client.rekey(session.token)
        finally:
            await client.close()

    asyncio.run(scenario())


@pytest.mark.processes
def test_feed_lists_then_streams_every_change(auth):
    first = auth.login("alice", PASSWORD)
    feed = auth.feed()
    listing = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    assert [s.session_id for s in listing.sessions] == [first.session_id]
    listed = listing.sessions[0]
    assert listed.current_keys.client_to_server_key == first.keys.client_to_server_key
    assert list(listed.tunnel_addresses) == ["198.19.0.2"]
    events = []
    watch = feed.WatchSessions(
        control_pb2.WatchSessionsRequest(after_revision=listing.revision), timeout=30
    )

    def read_events():
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            events.extend(watch)

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    second = auth.login("alice", PASSWORD)
    auth.stub().Rekey(auth_pb2.RekeyRequest(session_token=second.session_token), timeout=10)
    auth.stub().Logout(auth_pb2.LogoutRequest(session_token=first.session_token), timeout=10)
    deadline = time.monotonic() + 10
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.cancel()
    reader.join(5)
    kinds = [(e.WhichOneof("change"), e.revision) for e in events]
    assert [k for k, _ in kinds] == ["installed", "rotated", "removed"]
    assert [r for _, r in kinds] == [
        listing.revision + 1,
        listing.revision + 2,
        listing.revision + 3,
    ]
    assert events[0].installed.session_id == second.session_id
    assert events[1].rotated.keys.key_epoch == 1
    assert events[2].removed.reason == control_pb2.REMOVAL_REASON_LOGOUT
    again = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    assert [s.session_id for s in again.sessions] == [second.session_id]
    assert again.sessions[0].previous_keys.key_epoch == 0  # inside the grace period
    bad = feed.WatchSessions(control_pb2.WatchSessionsRequest(after_revision=10**6))
    assert _code(lambda: next(bad))[0] is grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.processes
def test_restart_keeps_sessions_and_asks_old_watchers_to_list_again(auth):
    login = auth.login("alice", PASSWORD)
    before = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    auth.stop(signal.SIGKILL)
    auth.start()
    info = auth.stub().SessionInfo(
        auth_pb2.SessionInfoRequest(session_token=login.session_token), timeout=10
    )
    assert info.session_id == login.session_id
    after = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    assert after.revision == before.revision
    assert [s.session_id for s in after.sessions] == [login.session_id]
    stale = auth.feed().WatchSessions(
        control_pb2.WatchSessionsRequest(after_revision=before.revision - 1)
    )
    assert _code(lambda: next(stale))[0] is grpc.StatusCode.OUT_OF_RANGE
    assert auth.login("alice", PASSWORD).tunnel_address == "198.19.0.3/24"  # .2 is still taken


@pytest.mark.processes
def test_wrong_ca_and_plaintext_are_refused(auth):
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    other_ca, _, _, _ = make_ca("someone else", now, ["localhost"])
    stranger = auth_pb2_grpc_stub(auth.channel(root=other_ca))
    assert (
        _code(
            lambda: stranger.Login(
                auth_pb2.LoginRequest(username="alice", password=PASSWORD), timeout=5
            )
        )[0]
        is grpc.StatusCode.UNAVAILABLE
    )
    plain = grpc.insecure_channel(f"127.0.0.1:{auth.port}")
    try:
        stub = auth_pb2_grpc_stub(plain)
        assert (
            _code(
                lambda: stub.Login(
                    auth_pb2.LoginRequest(username="alice", password=PASSWORD), timeout=5
                )
            )[0]
            is grpc.StatusCode.UNAVAILABLE
        )
    finally:
        plain.close()
    assert make_server_cert  # the same PKI code made the real certificates


def auth_pb2_grpc_stub(channel):
    from pushgate_api import auth_pb2_grpc

    return auth_pb2_grpc.AuthStub(channel)


@pytest.mark.netns
def test_control_socket_is_private(auth):
    mode = stat.S_IMODE(os.stat(auth.control_socket).st_mode)
    assert mode == 0o600
    assert refuses_nobody(auth.control_socket)


def _reflected_services(channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.processes
def test_health_and_reflection_only_when_switched_on(auth, tmp_path):
    channel = auth.channel()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as off:
        _reflected_services(channel)
    assert off.value.code() is grpc.StatusCode.UNIMPLEMENTED  # off on the public port by default
    server = AuthServer(str(tmp_path / "reflecting"), settings={"reflection": "true"})
    server.start()
    try:
        assert "pushgate.auth.v1.Auth" in _reflected_services(server.channel())
    finally:
        server.stop()


@pytest.mark.processes
def test_metrics_count_logins_by_result(auth):
    auth.login("alice", PASSWORD)
    _code(lambda: auth.login("alice", "wrong"))
    import urllib.request

    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{auth.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'pushgate_auth_logins_total{result="success"} 1.0' in text
    assert 'pushgate_auth_logins_total{result="bad_credentials"} 1.0' in text
    assert "pushgate_auth_sessions_active 1.0" in text
    assert 'pushgate_auth_pool_addresses{state="free"} 252.0' in text


@pytest.mark.processes
def test_admin_user_commands(tmp_path):
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("carol", PASSWORD)
    config = server.config
    again = admin("user", "add", "carol", "--config", config, password="x")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert admin("user", "passwd", "carol", "--config", config, password="new").returncode == 0
    assert admin("user", "list", "--config", config).stdout == "carol\tenabled\n"
    missing = admin("user", "remove", "dave", "--config", config)
    assert missing.returncode == 1 and "no such user dave" in missing.stderr
    no_password = admin("user", "add", "erin", "--config", config)
    assert no_password.returncode == 1 and "no password" in no_password.stderr
    broken = admin("user", "list", "--config", str(tmp_path / "missing.toml"))
    assert broken.returncode == 1 and "cannot read config" in broken.stderr
    assert admin("user", "remove", "carol", "--config", config).returncode == 0
    db = os.path.join(server.directory, "pushgate.db")
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


@pytest.mark.processes
def test_sessions_expire_on_schedule_and_the_feed_says_so(tmp_path):
    server = AuthServer(str(tmp_path / "gw"), settings={"session_lifetime_seconds": "2"})
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        login = server.login("alice", PASSWORD)
        feed = server.feed()
        listing = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        assert len(listing.sessions) == 1
        watch = feed.WatchSessions(
            control_pb2.WatchSessionsRequest(after_revision=listing.revision), timeout=15
        )
        event = next(watch)
        watch.cancel()
        assert event.WhichOneof("change") == "removed"
        assert event.removed.session_id == login.session_id
        assert event.removed.reason == control_pb2.REMOVAL_REASON_EXPIRED
        code, _ = _code(
            lambda: server.stub().SessionInfo(
                auth_pb2.SessionInfoRequest(session_token=login.session_token), timeout=10
            )
        )
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert server.login("alice", PASSWORD).tunnel_address == "198.19.0.2/24"  # released
    finally:
        server.stop()


def _feed_events(feed, after: int, count: int) -> list:
    watch = feed.WatchSessions(control_pb2.WatchSessionsRequest(after_revision=after), timeout=15)
    events = [next(watch) for _ in range(count)]
    watch.cancel()
    return events


@pytest.mark.processes
def test_a_login_beyond_the_cap_ends_the_users_oldest_session_and_tells_the_dataplane(tmp_path):
    """max_sessions_per_user (default 3): a further login ends the oldest session, in
    the store and, through a removal event (reason REPLACED) before the install, in
    the dataplane; one account can no longer take the address pool."""
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("alice", PASSWORD)
    server.add_user("bob", PASSWORD)
    server.start()
    try:
        bob = server.login("bob", PASSWORD)
        first, second, third = (server.login("alice", PASSWORD) for _ in range(3))
        feed = server.feed()
        revision = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10).revision
        fourth = server.login("alice", PASSWORD)
        removed, installed = _feed_events(feed, revision, 2)
        assert removed.removed.session_id == first.session_id
        assert removed.removed.reason == control_pb2.REMOVAL_REASON_REPLACED
        assert installed.installed.session_id == fourth.session_id
        assert installed.revision == removed.revision + 1
        stub = server.stub()

        def alive(login) -> bool:
            request = auth_pb2.SessionInfoRequest(session_token=login.session_token)
            try:
                stub.SessionInfo(request, timeout=10)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        assert [alive(s) for s in (first, second, third, fourth, bob)] == [
            False, True, True, True, True
        ]  # fmt: skip
        for _ in range(20):  # the 252-login attack: alice never holds more than 3
            server.login("alice", PASSWORD)
        listing = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        owners = sorted(s.username for s in listing.sessions)
        assert owners == ["alice", "alice", "alice", "bob"]
        assert not alive(fourth) and alive(bob)
        text = Path(server.directory, "auth.log").read_text()
        assert f"session={first.session_id:#010x} user='alice' ended: replaced" in text
        scraped = metrics.scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert metrics.total(scraped, "pushgate_auth_sessions_replaced_total") == 21
    finally:
        server.stop()


def _check(server, timeout: float = 2.0):
    command = [os.path.join(BIN, "pushgate-auth"), "--config", server.config, "--check"]
    return subprocess.run(
        [*command, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _notifications(sock, seconds: float) -> list[str]:
    """The sd_notify messages that arrive within `seconds`."""
    received, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return received


@pytest.mark.processes
def test_health_follows_a_self_check_so_a_locked_database_or_wedged_loop_is_unhealthy(
    tmp_path, monkeypatch
):
    """gRPC health on the client port says NOT_SERVING while the database will not take
    a write (another process holds its write lock), and `pushgate-auth --check` (the
    compose health check) fails then, and also when the event loop is wedged (a login
    blocked on that lock holds it for SQLite's 5 s busy timeout): it gets no answer."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's side
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    server = AuthServer(str(tmp_path / "gw"))
    server.add_user("alice", PASSWORD)
    server.start()
    stub = health_pb2_grpc.HealthStub(server.channel())

    def status() -> int:
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def age() -> float:
        scraped = metrics.scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
        return metrics.total(scraped, "pushgate_auth_self_check_age_seconds")

    locker = sqlite3.connect(os.path.join(server.directory, "pushgate.db"), isolation_level=None)
    try:
        assert status() == health_pb2.HealthCheckResponse.SERVING
        said = _notifications(notify, 2.5)
        assert "READY=1" in said and "WATCHDOG=1" in said, said
        locker.execute("BEGIN IMMEDIATE")  # the write lock, held as a stuck writer would
        wait_for(
            lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING,
            10,
            what="health NOT_SERVING while the database is locked",
        )
        _notifications(notify, 0.5)  # one may have been on its way
        assert "WATCHDOG=1" not in _notifications(notify, 2.5)  # systemd would restart it
        locked = _check(server)
        assert locked.returncode == 1 and "reports NOT_SERVING" in locked.stderr, locked
        login = threading.Thread(target=lambda: _code(lambda: server.login("alice", PASSWORD)))
        login.start()  # its session write blocks the event loop on the lock
        time.sleep(1.0)
        wedged = _check(server, timeout=2.0)
        assert wedged.returncode == 1 and "no answer" in wedged.stderr, wedged
        assert age() > 2.0  # the metrics thread still answers and shows the stall
        login.join(30)
        locker.execute("ROLLBACK")
        wait_for(lambda: _check(server).returncode == 0, 10, what="healthy again")
        healthy = _check(server)
        assert healthy.returncode == 0 and "healthy (SERVING)" in healthy.stdout, healthy.stderr
        assert status() == health_pb2.HealthCheckResponse.SERVING and age() < 3
        assert "self-check fails" in Path(server.directory, "auth.log").read_text()
    finally:
        locker.close()
        notify.close()
        server.stop()


@pytest.mark.processes
def test_a_preferred_cipher_is_honoured_and_an_unknown_one_refused(auth):
    stub = auth.stub()
    chacha = auth_pb2.CIPHER_SUITE_CHACHA20_POLY1305
    request = auth_pb2.LoginRequest(username="alice", password=PASSWORD, preferred_cipher=chacha)
    assert stub.Login(request, timeout=30).cipher == chacha
    unknown = auth_pb2.LoginRequest(username="alice", password=PASSWORD, preferred_cipher=99)
    assert _code(lambda: stub.Login(unknown, timeout=10))[0] is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.processes
def test_a_client_that_completes_checksums_gets_partial_ones_through_logins_and_renewals(auth):
    """LoginRequest.completes_checksums is kept with the session, answered, and fed to
    the dataplane (docs/protocol.md, "Partial checksums"); a renewal says it again for
    its new session; a client that does not say it gets complete checksums."""
    stub = auth.stub()
    plain = auth.login("alice", PASSWORD)
    partial = stub.Login(
        auth_pb2.LoginRequest(username="alice", password=PASSWORD, completes_checksums=True),
        timeout=30,
    )
    assert (plain.partial_checksums, partial.partial_checksums) == (False, True)
    renewed = stub.Renew(
        auth_pb2.RenewRequest(renewal_token=partial.renewal_token, completes_checksums=True),
        timeout=30,
    )
    renewed_plain = stub.Renew(auth_pb2.RenewRequest(renewal_token=plain.renewal_token), timeout=30)
    assert (renewed.partial_checksums, renewed_plain.partial_checksums) == (True, False)
    listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    fed = {s.session_id: s.partial_checksums for s in listing.sessions}
    assert fed[renewed.session_id] is True and fed[renewed_plain.session_id] is False
