"""Access policy through a real pushgate-auth: every Session on the feed carries its
user's AccessPolicy, a reload (SIGHUP) or a membership change sends a PolicyChange to
each affected live session within 1 s, a wrong file on reload keeps the last good
rules, and Login, Rekey and SessionInfo answers carry the user's NetworkConfig."""

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from auth_service.store import Store
from netlab import wait_for
from netlab.auth import AuthServer, admin
from pushgate_api import auth_pb2, control_pb2

pytestmark = pytest.mark.processes

PASSWORD = "correct horse battery staple"
PROPAGATION_SECONDS = 1.0  # issue 18: live sessions learn a change within this

GROUPS = """
[groups.eng]
allow = ["198.18.2.10/32", "198.18.3.0/24 tcp 22"]
match_domains = ["eng.example"]

[groups.sales]
allow = ["198.18.2.20/32"]
dns_servers = ["198.18.2.53"]
"""


def rules(policy) -> list[str]:
    return [
        f"{r.destination} {r.protocol} {','.join(f'{p.first}-{p.last}' for p in r.ports)}".strip()
        for r in policy.allow
    ]


OFFERED = ["198.19.0.1/32 1"]  # ping to the gateway address, offered by default


class Watch:
    """The feed's events after the current listing, read in a thread."""

    def __init__(self, auth) -> None:
        feed = auth.feed()
        self.listing = feed.ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        self._call = feed.WatchSessions(
            control_pb2.WatchSessionsRequest(after_revision=self.listing.revision), timeout=60
        )
        self.events: list = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for event in self._call:
                self.events.append((time.monotonic(), event))

    def changes(self, since: float = 0.0) -> dict[int, tuple[float, control_pb2.AccessPolicy]]:
        return {
            e.policy_changed.session_id: (at, e.policy_changed.policy)
            for at, e in self.events
            if e.WhichOneof("change") == "policy_changed" and at >= since
        }

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


@pytest.fixture
def auth(tmp_path):
    server = AuthServer(str(tmp_path / "gw"))
    with open(server.config, "a") as handle:
        handle.write(GROUPS)
    for name in ("alice", "bob", "carol"):
        server.add_user(name, PASSWORD)
    store = Store(str(Path(server.directory, "pushgate.db")))
    store.add_members("eng", ["alice"])
    store.add_members("sales", ["bob"])
    store.close()
    server.start()
    yield server
    server.stop()


def _log(auth) -> str:
    return Path(auth.directory, "auth.log").read_text()


def test_sessions_carry_their_users_policy_and_network(auth):
    alice, bob = auth.login("alice", PASSWORD), auth.login("bob", PASSWORD)
    carol = auth.login("carol", PASSWORD)
    assert list(alice.network.routes) == ["198.18.2.10/32", "198.18.3.0/24"]
    assert list(alice.network.match_domains) == ["eng.example"]
    assert list(bob.network.routes) == ["198.18.2.20/32"]
    assert list(bob.network.dns_servers) == ["198.18.2.53"]
    assert list(carol.network.routes) == [] and alice.network.digest != bob.network.digest
    listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    policies = {s.session_id: s.policy for s in listing.sessions}
    assert rules(policies[alice.session_id]) == [
        "198.18.2.10/32 0",
        "198.18.3.0/24 6 22-22",
        *OFFERED,
    ]
    assert rules(policies[bob.session_id]) == ["198.18.2.20/32 0", *OFFERED]
    assert rules(policies[carol.session_id]) == OFFERED  # in no group: default deny
    assert len({p.digest for p in policies.values()}) == 3
    stub = auth.stub()
    info = stub.SessionInfo(auth_pb2.SessionInfoRequest(session_token=alice.session_token))
    rekey = stub.Rekey(auth_pb2.RekeyRequest(session_token=alice.session_token), timeout=10)
    assert info.network == rekey.network == alice.network


def test_a_reload_reaches_affected_live_sessions_within_a_second(auth):
    alice, bob = auth.login("alice", PASSWORD), auth.login("bob", PASSWORD)
    watch = Watch(auth)
    try:
        text = Path(auth.config).read_text()
        Path(auth.config).write_text(text.replace('"198.18.2.10/32", ', ""))
        sent = time.monotonic()
        auth.process.send_signal(signal.SIGHUP)
        changes = wait_for(lambda: watch.changes(), 5, 0.02, "a PolicyChange")
        at, policy = changes[alice.session_id]
        assert at - sent <= PROPAGATION_SECONDS
        assert rules(policy) == ["198.18.3.0/24 6 22-22", *OFFERED]
        time.sleep(0.3)
        assert list(watch.changes()) == [alice.session_id]  # bob's rules did not change
        # the new rules hold for new sessions and for the answers to live ones
        info = auth.stub().SessionInfo(
            auth_pb2.SessionInfoRequest(session_token=alice.session_token)
        )
        assert list(info.network.routes) == ["198.18.3.0/24"]
        listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        assert {s.session_id: s.policy.digest for s in listing.sessions}[
            alice.session_id
        ] == policy.digest
        assert bob.session_id in {s.session_id for s in listing.sessions}
    finally:
        watch.close()


def test_a_wrong_file_on_reload_keeps_the_last_good_rules(auth):
    alice = auth.login("alice", PASSWORD)
    before = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    text = Path(auth.config).read_text()
    wrong = text.replace('"198.18.3.0/24 tcp 22"', '"198.18.3.1/24 tcp 22"')
    Path(auth.config).write_text(wrong)
    line = wrong[: wrong.index("198.18.3.1/24")].count("\n") + 1
    watch = Watch(auth)
    try:
        auth.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in _log(auth), 5, 0.05, "the refusal in the log")
        assert f"pushgate.toml:{line}: [groups.eng] allow: '198.18.3.1/24 tcp 22'" in _log(auth)
        time.sleep(0.3)
        assert watch.changes() == {}
        assert auth.process.poll() is None
        again = auth.login("alice", PASSWORD)
        assert list(again.network.routes) == list(alice.network.routes)
        listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        digests = {s.policy.digest for s in listing.sessions}
        assert digests == {before.sessions[0].policy.digest}
    finally:
        watch.close()


def _audit(auth) -> list[dict]:
    with open(Path(auth.directory, "audit.log")) as handle:
        return [json.loads(line) for line in handle]


def test_a_membership_change_reaches_the_users_live_sessions_within_a_second(auth):
    carol = auth.login("carol", PASSWORD)
    bob = auth.login("bob", PASSWORD)
    watch = Watch(auth)
    try:
        sent = time.monotonic()
        result = admin("group", "add", "eng", "carol", "alice", "--config", auth.config)
        assert result.returncode == 0, result.stderr
        # alice was a member already; carol's one live session is told
        assert result.stdout == "carol added to group eng; 1 live session got the new access\n"
        changes = wait_for(lambda: watch.changes(), 5, 0.02, "a PolicyChange")
        at, policy = changes[carol.session_id]
        assert at - sent <= PROPAGATION_SECONDS
        assert rules(policy) == ["198.18.2.10/32 0", "198.18.3.0/24 6 22-22", *OFFERED]
        info = auth.stub().SessionInfo(
            auth_pb2.SessionInfoRequest(session_token=carol.session_token)
        )
        assert list(info.network.match_domains) == ["eng.example"]
        result = admin("group", "remove", "sales", "bob", "--config", auth.config)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: bob.session_id in watch.changes(), 5, 0.02, "bob's PolicyChange")
        assert rules(watch.changes()[bob.session_id][1]) == OFFERED
        assert len(watch.changes()) == 2
        record = [r for r in _audit(auth) if r.get("action") == "group_add"][-1]
        assert record["group"] == "eng" and record["users"] == ["carol"]
        assert record["updated_sessions"] == [f"{carol.session_id:#010x}"]
        assert isinstance(record["caller_uid"], int)
    finally:
        watch.close()


def test_groups_the_config_does_not_declare_are_refused(auth):
    result = admin("group", "add", "engineering", "alice", "--config", auth.config)
    assert result.returncode == 1
    assert result.stderr == (
        "pushgate-admin: no group 'engineering' in the config (declared: eng, sales)\n"
    )
    result = admin(
        "user",
        "add",
        "dave",
        "--group",
        "eng",
        "--group",
        "ops",
        "--config",
        auth.config,
        password=PASSWORD,
    )
    assert result.returncode == 1 and "no group 'ops' in the config" in result.stderr
    assert "dave" not in admin("user", "list", "--config", auth.config).stdout
    result = admin("group", "add", "eng", "nobody-here", "--config", auth.config)
    assert result.returncode == 1 and "no such user nobody-here" in result.stderr


def test_user_add_with_groups_and_group_list(auth):
    result = admin(
        "user",
        "add",
        "dave",
        "--group",
        "eng",
        "--group",
        "sales",
        "--config",
        auth.config,
        password=PASSWORD,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "user dave added to group(s) eng, sales\n"
    login = auth.login("dave", PASSWORD)
    assert list(login.network.routes) == ["198.18.2.10/32", "198.18.2.20/32", "198.18.3.0/24"]
    listed = admin("group", "list", "--json", "--config", auth.config)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {
            "group": "eng",
            "declared": True,
            "rules": 2,
            "members": [
                {"user": "alice", "sources": ["admin"]},
                {"user": "dave", "sources": ["admin"]},
            ],
        },
        {
            "group": "sales",
            "declared": True,
            "rules": 1,
            "members": [
                {"user": "bob", "sources": ["admin"]},
                {"user": "dave", "sources": ["admin"]},
            ],
        },
    ]
    one = admin("group", "list", "sales", "--config", auth.config)
    assert one.stdout == "sales\t1 rules\tbob, dave\n"


def test_membership_changes_while_the_service_is_down_apply_when_it_starts(auth):
    alice = auth.login("alice", PASSWORD)
    auth.stop()
    result = admin("group", "remove", "eng", "alice", "--config", auth.config)
    assert result.returncode == 0, result.stderr
    assert "not running" in result.stdout
    assert admin("group", "add", "nope", "alice", "--config", auth.config).returncode == 1
    listed = admin("group", "list", "eng", "--json", "--config", auth.config)
    assert json.loads(listed.stdout)["members"] == []
    auth.start()
    listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
    assert rules(listing.sessions[0].policy) == OFFERED
    info = auth.stub().SessionInfo(auth_pb2.SessionInfoRequest(session_token=alice.session_token))
    assert list(info.network.routes) == []
    offline = [r for r in _audit(auth) if r.get("offline") and r["action"].startswith("group")]
    assert [(r["action"], r["group"], r["users"]) for r in offline] == [
        ("group_remove", "eng", ["alice"])
    ]


def test_without_groups_every_user_reaches_the_routes_but_no_other_client(tmp_path):
    server = AuthServer(str(tmp_path / "gw"), init_args=("--route", "198.18.0.0/16"))
    server.add_user("alice", PASSWORD)
    server.start()
    try:
        login = server.login("alice", PASSWORD)
        assert list(login.network.routes) == ["198.18.0.0/16"]
        listing = server.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        assert rules(listing.sessions[0].policy) == ["198.18.0.0/16 0", *OFFERED]
        assert _log(server).count("the compatibility mode") == 1
    finally:
        server.stop()
