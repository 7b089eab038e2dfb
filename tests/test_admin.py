"""Revocation, the admin API and its CLI, structured refusals, the audit log:
a real pushgate-auth (gRPC over TLS, the admin and feed Unix sockets, SQLite)."""

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from auth_service.sessions import MAX_SESSION_LIFETIME_SECONDS, session_lifetime
from client import cli as client_cli
from client import profile
from client.auth import (
    EXIT_ACCESS_REVOKED,
    AccessRevoked,
    AuthClient,
    ClientError,
    SessionGone,
    refusal_of,
)
from netlab import refuses_nobody, run_as_nobody, wait_for
from netlab.auth import AuthServer, admin
from pushgate_api import auth_pb2, control_pb2

# Starts real pushgate-auth processes (netlab.auth.AuthServer); see pyproject.toml.
pytestmark = pytest.mark.processes

PASSWORD = "correct horse battery staple"


@pytest.fixture
def auth(tmp_path):
    server = AuthServer(
        str(tmp_path / "gw"),
        settings={"max_failures_before_delay": "2", "max_failure_delay_seconds": "30.0"},
    )
    for name in ("alice", "bob"):
        server.add_user(name, PASSWORD)
    server.start()
    yield server
    server.stop()


def _client(auth) -> AuthClient:
    return AuthClient(f"localhost:{auth.port}", str(Path(auth.directory, "tls", "ca.crt")))


def _refusal(call) -> tuple[grpc.StatusCode, auth_pb2.Refusal]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    refusal = refusal_of(caught.value)
    assert refusal is not None, caught.value
    return caught.value.code(), refusal


def _session_call(auth, method: str, token: str):
    stub = auth.stub()
    requests = {
        "Rekey": auth_pb2.RekeyRequest,
        "SessionInfo": auth_pb2.SessionInfoRequest,
        "Logout": auth_pb2.LogoutRequest,
    }
    return getattr(stub, method)(requests[method](session_token=token), timeout=10)


class FeedWatch:
    """Every event of the session feed after the current revision, read in a thread."""

    def __init__(self, auth) -> None:
        feed = auth.feed()
        revision = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10).revision
        self._call = feed.WatchSessions(
            control_pb2.WatchSessionsRequest(after_revision=revision), timeout=60
        )
        self.events: list = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.events.extend(self._call)

    def removals(self) -> list[tuple[int, int]]:
        return [
            (e.removed.session_id, e.removed.reason)
            for e in self.events
            if e.WhichOneof("change") == "removed"
        ]

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


def _audit(auth) -> list[dict]:
    with open(os.path.join(auth.directory, "audit.log")) as handle:
        return [json.loads(line) for line in handle]


def test_login_refusals_carry_their_reason_as_a_structured_detail(auth):
    stub = auth.stub()
    code, refusal = _refusal(
        lambda: stub.Login(auth_pb2.LoginRequest(username="alice", password="wrong"), timeout=10)
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert refusal.reason == auth_pb2.REFUSAL_REASON_BAD_CREDENTIALS
    code, refusal = _refusal(
        lambda: stub.Login(auth_pb2.LoginRequest(username="alice", password=""), timeout=10)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.reason == auth_pb2.REFUSAL_REASON_INVALID_REQUEST
    for _ in range(2):  # the second free failure, then one beyond
        _refusal(lambda: auth.login("alice", "wrong"))
    code, refusal = _refusal(lambda: auth.login("alice", PASSWORD))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal.reason == auth_pb2.REFUSAL_REASON_THROTTLED
    assert refusal.retry_after_seconds >= 1
    code, refusal = _refusal(lambda: _session_call(auth, "Rekey", "no-such-token"))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert refusal.reason == auth_pb2.REFUSAL_REASON_SESSION_UNKNOWN


def test_pool_exhaustion_is_told_by_reason_not_by_text(tmp_path):
    server = AuthServer(  # the smallest network the config takes: five client addresses
        str(tmp_path / "gw"), network="198.19.0.0/29", settings={"max_sessions_per_user": "5"}
    )
    server.add_user("alice", PASSWORD)
    server.add_user("bob", PASSWORD)
    server.start()
    try:
        for _ in range(5):
            server.login("alice", PASSWORD)
        code, refusal = _refusal(lambda: server.login("bob", PASSWORD))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refusal.reason == auth_pb2.REFUSAL_REASON_NO_FREE_ADDRESS

        async def client_view():
            client = _client(server)
            try:
                with pytest.raises(ClientError, match="no free tunnel address") as caught:
                    await client.login("bob", PASSWORD)
                assert caught.value.retryable
            finally:
                await client.close()

        asyncio.run(client_view())
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("command", "cause", "message"),
    [
        (("user", "disable", "alice"), auth_pb2.REVOCATION_CAUSE_USER_DISABLED, "disabled"),
        (("user", "remove", "alice"), auth_pb2.REVOCATION_CAUSE_USER_REMOVED, "removed"),
        (("user", "passwd", "alice"), auth_pb2.REVOCATION_CAUSE_PASSWORD_CHANGED, "password"),
        (("session", "kick", "--user", "alice"), auth_pb2.REVOCATION_CAUSE_KICKED, "ended"),
    ],
)
def test_admin_changes_end_live_sessions_at_once_and_the_client_is_told(
    auth, command, cause, message
):
    alice = [auth.login("alice", PASSWORD) for _ in range(2)]
    bob = auth.login("bob", PASSWORD)
    watch = FeedWatch(auth)
    try:
        result = admin(*command, "--config", auth.config, password="a new password")
        assert result.returncode == 0, result.stderr
        assert "2" in result.stdout and "ended" in result.stdout, result.stdout
        # published at once: the admin command returned after the feed had both removals
        wait_for(lambda: len(watch.removals()) == 2, 10, what="two removals on the feed")
    finally:
        watch.close()
    assert sorted(watch.removals()) == sorted(
        (s.session_id, control_pb2.REMOVAL_REASON_ADMIN) for s in alice
    )
    for method in ("Rekey", "SessionInfo", "Logout"):
        code, refusal = _refusal(lambda m=method: _session_call(auth, m, alice[0].session_token))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert refusal.reason == auth_pb2.REFUSAL_REASON_SESSION_REVOKED
        assert refusal.revocation == cause
    assert _session_call(auth, "SessionInfo", bob.session_token).username == "bob"

    async def client_view():
        client = _client(auth)
        try:
            with pytest.raises(AccessRevoked, match=message) as caught:
                await client.rekey(alice[1].session_token)
            assert not caught.value.retryable
            assert caught.value.exit_code == EXIT_ACCESS_REVOKED
            with pytest.raises(AccessRevoked, match="access revoked by the administrator"):
                await client.session_alive(alice[1].session_token)
        finally:
            await client.close()

    asyncio.run(client_view())
    ends = [e for e in _audit(auth) if e["event"] == "session_end" and e["user"] == "alice"]
    assert sorted(e["session"] for e in ends) == sorted(f"{s.session_id:#010x}" for s in alice)
    assert {(e["reason"], e.get("cause")) for e in ends} == {
        (
            "admin",
            {1: "kicked", 2: "user_disabled", 3: "user_removed", 4: "password_changed"}[cause],
        )
    }
    changes = [e for e in _audit(auth) if e["event"] == "admin"]
    offline = [(e["action"], e["user"]) for e in changes if e.get("offline")]
    assert offline == [("user_add", "alice"), ("user_add", "bob")]  # the fixture, before start
    live = [e for e in changes if not e.get("offline")]
    assert len(live) == 1 and live[0]["caller_uid"] == os.geteuid()
    assert PASSWORD not in Path(auth.directory, "audit.log").read_text()
    assert "a new password" not in Path(auth.directory, "audit.log").read_text()


def test_user_add_goes_through_the_running_service(auth):
    added = admin("user", "add", "carol", "--config", auth.config, password="pw for carol")
    assert added.returncode == 0 and added.stdout == "user carol added\n", added
    assert auth.login("carol", "pw for carol").session_id
    again = admin("user", "add", "carol", "--config", auth.config, password="x")
    assert again.returncode == 1 and "user carol already exists" in again.stderr, again
    (entry,) = [e for e in _audit(auth) if e["event"] == "admin" and not e.get("offline")]
    assert entry["action"] == "user_add" and entry["user"] == "carol"


def test_enable_ends_nothing_and_a_kicked_user_may_log_in_again(auth):
    login = auth.login("alice", PASSWORD)
    result = admin("user", "enable", "alice", "--config", auth.config)
    assert result.returncode == 0 and result.stdout == "user alice enabled\n", result
    assert _session_call(auth, "SessionInfo", login.session_token).username == "alice"
    kick = admin("session", "kick", f"{login.session_id:#010x}", "--config", auth.config)
    assert kick.returncode == 0 and f"{login.session_id:#010x}" in kick.stdout, kick
    assert auth.login("alice", PASSWORD).session_id
    again = admin("session", "kick", f"{login.session_id:#010x}", "--config", auth.config)
    assert again.returncode == 1 and "no live session" in again.stderr, again


def test_session_list_and_show(auth):
    alice = auth.login("alice", PASSWORD)
    bob = auth.login("bob", PASSWORD)
    listed = admin("session", "list", "--json", "--config", auth.config)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["user"] for r in rows] == ["alice", "bob"]
    assert rows[0]["session"] == f"{alice.session_id:#010x}"
    assert rows[0]["tunnel_address"] == alice.tunnel_address
    assert rows[0]["login_source"] == "127.0.0.1"
    assert rows[0]["key_epoch"] == 0
    # no dataplane runs here: its columns are empty and the command says why
    assert rows[0]["rx_packets"] is None and "dataplane statistics unavailable" in listed.stderr
    only_bob = json.loads(
        admin("session", "list", "--user", "bob", "--json", "--config", auth.config).stdout
    )
    assert [r["session"] for r in only_bob] == [f"{bob.session_id:#010x}"]
    table = admin("session", "list", "--config", auth.config).stdout.splitlines()
    assert table[0].split()[:3] == ["SESSION", "USER", "ADDRESS"]
    assert [line.split()[1] for line in table[1:]] == ["alice", "bob"]
    shown = admin("session", "show", f"{bob.session_id:#010x}", "--config", auth.config)
    assert shown.returncode == 0 and "user:" in shown.stdout and "bob" in shown.stdout
    admin("session", "kick", "--user", "alice", "--config", auth.config)
    after = json.loads(admin("session", "list", "--json", "--config", auth.config).stdout)
    assert [r["user"] for r in after] == ["bob"]


def test_changes_made_while_the_service_is_down_take_effect_at_start(auth):
    alice = auth.login("alice", PASSWORD)
    bob = auth.login("bob", PASSWORD)
    auth.stop()
    offline = admin("user", "disable", "alice", "--config", auth.config)
    assert offline.returncode == 0 and "not running" in offline.stdout, offline
    down = admin("session", "list", "--config", auth.config)
    assert down.returncode == 1 and "not running" in down.stderr
    auth.start()
    code, refusal = _refusal(lambda: _session_call(auth, "Rekey", alice.session_token))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert refusal.revocation == auth_pb2.REVOCATION_CAUSE_USER_DISABLED
    listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    assert [s.session_id for s in listing.sessions] == [bob.session_id]


def test_a_database_edit_behind_the_services_back_is_caught_by_rekey_at_once(auth):
    """`Rekey` and `SessionInfo` re-check the account, not only the every-second sweep."""
    from auth_service.store import Store

    alice = auth.login("alice", PASSWORD)
    store = Store(os.path.join(auth.directory, "pushgate.db"))
    try:
        store.set_disabled("alice", True)
    finally:
        store.close()
    code, refusal = _refusal(lambda: _session_call(auth, "Rekey", alice.session_token))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert refusal.revocation == auth_pb2.REVOCATION_CAUSE_USER_DISABLED


@pytest.mark.netns  # refuses_nobody switches uid
def test_admin_socket_is_private(auth):
    path = os.path.join(auth.directory, "run", "admin.sock")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert refuses_nobody(path)
    # Behind the mode, the peer check: even through a socket opened to all, the
    # connection of a stranger is closed before a byte of it is read, and counted.
    os.chmod(path, 0o666)
    try:
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            " s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
            " print('closed' if s.recv(100) == b'' else 'answered')\n"
            "except (ConnectionResetError, BrokenPipeError): print('closed')\n"
        )
        assert run_as_nobody(probe, path).stdout.strip() == "closed"
    finally:
        os.chmod(path, 0o600)
    wait_for(
        lambda: "pushgate_auth_admin_peers_refused_total 1.0" in auth.metrics_text(),
        10,
        what="the refused peer counted",
    )


def test_audit_counts_match_the_login_metric(auth):
    for password in ("wrong", PASSWORD, "wrong", "wrong", PASSWORD):
        with contextlib.suppress(grpc.RpcError):
            auth.login("bob", password)
    session = auth.login("alice", PASSWORD)
    _session_call(auth, "Logout", session.session_token)
    text = auth.metrics_text()
    logins = [e for e in _audit(auth) if e["event"] == "login"]
    for result in ("success", "bad_credentials", "throttled"):
        line = next(
            line
            for line in text.splitlines()
            if line.startswith(f'pushgate_auth_logins_total{{result="{result}"}}')
        )
        assert float(line.split()[-1]) == sum(1 for e in logins if e["result"] == result)
    ends = [e for e in _audit(auth) if e["event"] == "session_end"]
    assert ends == [
        {**ends[0], "session": f"{session.session_id:#010x}", "user": "alice", "reason": "logout"}
    ]
    assert all(set(e) >= {"time", "user", "source"} for e in logins)


def test_session_lifetime_zero_is_capped():
    assert session_lifetime(0) == MAX_SESSION_LIFETIME_SECONDS
    assert session_lifetime(10 * 365 * 86400) == MAX_SESSION_LIFETIME_SECONDS
    assert session_lifetime(3600) == 3600


def test_the_client_exits_with_the_revoked_message_and_its_own_code(monkeypatch, capsys):
    def revoked(args):
        raise AccessRevoked(auth_pb2.REVOCATION_CAUSE_USER_DISABLED)

    monkeypatch.setattr(client_cli, "cmd_status", revoked)
    parser = client_cli.build_parser()
    monkeypatch.setattr(
        client_cli,
        "build_parser",
        lambda: parser,
    )
    parser._subparsers._group_actions[0].choices["status"].set_defaults(func=revoked)
    assert client_cli.main(["status"]) == EXIT_ACCESS_REVOKED == 3
    assert "access revoked by the administrator: the account is disabled" in capsys.readouterr().err
    assert SessionGone().exit_code == ClientError("x", retryable=False).exit_code == 2


def test_a_client_profile_holds_what_a_client_needs_but_the_password(auth, tmp_path):
    result = admin("user", "profile", "alice", "--config", auth.config)
    assert result.returncode == 0, result.stderr
    loaded = profile.parse(result.stdout)
    assert loaded.server == f"localhost:{auth.port}" and loaded.user == "alice"
    assert loaded.server_name is None  # the certificate names localhost
    assert loaded.ca_pem.encode().strip() == auth.ca.strip()
    assert PASSWORD not in result.stdout and "PRIVATE KEY" not in result.stdout
    by_address = admin(
        "user", "profile", "alice", "--server", f"127.0.0.1:{auth.port}", "--config", auth.config
    )
    path = tmp_path / "alice.pushgate"
    path.write_text(by_address.stdout)
    assert profile.read(str(path)).server_name == "localhost"

    async def log_in_with_it():
        loaded = profile.read(str(path))
        client = AuthClient(loaded.server, str(path), loaded.server_name)
        try:
            return await client.login(loaded.user, PASSWORD)
        finally:
            await client.close()

    assert asyncio.run(log_in_with_it()).session_id
    missing = admin("user", "profile", "dave", "--config", auth.config)
    assert missing.returncode == 1 and "no such user dave" in missing.stderr
    with pytest.raises(profile.ProfileError, match="no PEM certificate"):
        profile.parse('[profile]\nserver = "a:1"\nuser = "u"\nca = "x"\n')


def test_audit_log_over_churn_and_guessing_matches_the_metrics(tmp_path):
    """Logins by result in the audit log equal pushgate_auth_logins_total; every
    session created has exactly one end event (logout, replaced, expired, admin)."""
    server = AuthServer(
        str(tmp_path / "gw"),
        settings={"session_lifetime_seconds": "3", "max_failures_before_delay": "3"},
    )
    server.add_user("alice", PASSWORD)
    server.add_user("bob", PASSWORD)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    server.start()
    try:
        ca = str(Path(server.directory, "tls", "ca.crt"))
        target = f"localhost:{server.port}"

        def run(*args) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "netlab.churn", *args], stdout=subprocess.PIPE, text=True
            )

        left = [server.login("bob", PASSWORD) for _ in range(2)]  # to expire
        kicked = server.login("bob", PASSWORD)
        kick = admin("session", "kick", f"{kicked.session_id:#010x}", "--config", server.config)
        assert kick.returncode == 0, kick.stderr
        # 8 at a time against max_sessions_per_user = 3: logins replace sessions
        churners = [run("churn", target, ca, "alice", str(password_file), "60", "8")]
        churners.append(run("guess", target, ca, "alice,bob,nobody", "40"))
        for process in churners:
            assert process.wait(300) == 0
        wait_for(
            lambda: "pushgate_auth_sessions_active 0.0" in server.metrics_text(),
            30,
            what="every session ended",
        )
        text = server.metrics_text()
    finally:
        server.stop()
    events = [
        json.loads(line)
        for line in Path(server.directory, "audit.log").read_text().split("\n")[:-1]
    ]
    logins = Counter(e["result"] for e in events if e["event"] == "login")
    for line in text.splitlines():
        if line.startswith("pushgate_auth_logins_total{"):
            result = line.split('"')[1]
            assert logins[result] == float(line.split()[-1]), (result, logins)
    assert logins["success"] >= 63 and logins["bad_credentials"] > 0
    created = [e["session"] for e in events if e["event"] == "login" and e["result"] == "success"]
    ended = Counter(e["session"] for e in events if e["event"] == "session_end")
    assert ended == Counter(created)  # each exactly once
    reasons = {e["reason"] for e in events if e["event"] == "session_end"}
    assert reasons >= {"logout", "expired", "admin"}, reasons
    assert {f"{s.session_id:#010x}" for s in left} <= set(ended)
    assert PASSWORD not in Path(server.directory, "audit.log").read_text()
