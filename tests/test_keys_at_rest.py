"""Keys at rest: an ended session's keys, and keys a rekey replaced, leave no byte
behind in the auth service's SQLite files (the database, its WAL and its shared
memory index), read while the real service runs."""

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from auth_service.store import Store
from netlab.auth import AuthServer
from pushgate_api import auth_pb2

PASSWORD = "correct horse battery staple"
SWEEP_SECONDS = 1.0  # auth_service/cli.py: the sweep that expires sessions and wipes


def _database_bytes(directory: str) -> bytes:
    files = [Path(directory, "pushgate.db" + suffix) for suffix in ("", "-wal", "-shm")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def _keys(message) -> list[bytes]:
    return [message.client_to_server_key, message.server_to_client_key]


def _gone(stub, token: str) -> bool:
    try:
        stub.SessionInfo(auth_pb2.SessionInfoRequest(session_token=token), timeout=10)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        return True
    return False


@pytest.fixture
def auth(tmp_path):
    server = AuthServer(
        str(tmp_path / "gw"),
        settings={"key_lifetime_seconds": "1", "key_expiry_seconds": "3"},
    )
    server.add_user("alice", PASSWORD)
    server.start()
    yield server
    server.stop()


@pytest.mark.processes
def test_no_key_of_an_ended_session_or_a_replaced_key_stays_in_the_database_files(auth):
    stub = auth.stub()
    expiring = auth.login("alice", PASSWORD)  # left alone: expires 3 s after login
    logged_out = auth.login("alice", PASSWORD)
    ended = _keys(expiring.keys) + _keys(logged_out.keys)
    for _ in range(2):
        rekey = stub.Rekey(
            auth_pb2.RekeyRequest(session_token=logged_out.session_token), timeout=10
        )
        ended += _keys(rekey.keys)
    # live keys are always in the files (any older ones may be wiped by now)
    assert all(key in _database_bytes(auth.directory) for key in _keys(rekey.keys)), (
        "the scan must see keys that are in the files"
    )
    stub.Logout(auth_pb2.LogoutRequest(session_token=logged_out.session_token), timeout=10)
    kept = auth.login("alice", PASSWORD)
    generations = [_keys(kept.keys)]  # the kept session's keys, oldest first

    def rekey_kept() -> None:
        rekey = stub.Rekey(auth_pb2.RekeyRequest(session_token=kept.session_token), timeout=10)
        generations.append(_keys(rekey.keys))

    rekey_kept()
    rekey_kept()

    deadline = time.monotonic() + 15
    while not _gone(stub, expiring.session_token):
        assert time.monotonic() < deadline, "the session did not expire"
        rekey_kept()  # the kept session lives on, and replaces its keys meanwhile
        time.sleep(0.5)
    rekey_kept()
    time.sleep(2 * SWEEP_SECONDS)  # the sweep after the removal wipes
    on_disk = _database_bytes(auth.directory)
    assert [key for key in ended if key in on_disk] == []
    # the newest keys and the ones they replaced (kept for the rekey's grace period)
    # are live; every older generation was replaced twice and must be gone
    replaced = [key for keys in generations[:-2] for key in keys]
    assert [key for key in replaced if key in on_disk] == []
    assert all(key in on_disk for key in generations[-1] + generations[-2])


def test_the_store_sets_secure_delete_whatever_sqlites_build_default(tmp_path, monkeypatch):
    """Debian builds SQLite with secure_delete on by default; other builds do not."""
    connect = sqlite3.connect

    def connect_with_secure_delete_off(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    monkeypatch.setattr(sqlite3, "connect", connect_with_secure_delete_off)
    store = Store(str(tmp_path / "pushgate.db"))
    try:
        assert store.db.execute("PRAGMA secure_delete").fetchone() == (1,)
    finally:
        store.close()
