"""The local control sockets check who is at the other end (SO_PEERCRED), on both
sides: the auth service's session feed and the dataplane's stats socket refuse a
client of another uid, the dataplane refuses a session feed served by another
uid, each counted and logged; a socket directory another user owns or may write
is a clear start-up error. The strangers are real processes run as `nobody`."""

import asyncio
import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from dataplane.cli import serve_stats
from dataplane.metrics import Counters
from dataplane.registry import Registry
from dataplane.sync import SessionSync
from netlab import AS_NOBODY, NOBODY_PYTHON, NOBODY_UID, directories_opened, run_as_nobody
from netlab.auth import BIN, AuthServer
from pushgate_api import control_pb2, control_pb2_grpc
from pushgate_io.control_socket import PeerPolicy, directory_problem

PASSWORD = "correct horse battery staple"

# A client that speaks first, as gRPC's does (the HTTP/2 preface and SETTINGS), and
# prints how many bytes the server answered before closing or going quiet for 3 s.
STRANGER_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
got = 0
try:  # a refusal may close the connection before our first bytes are even sent
    s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    while data := s.recv(65536):
        got += len(data)
except (TimeoutError, ConnectionResetError, BrokenPipeError):
    pass
print(got)
"""

# A server on the given path that prints 'listening', then how many bytes its first
# client sent before closing or going quiet for 3 s.
STRANGER_SERVER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(3)
got = 0
try:
    while data := conn.recv(65536):
        got += len(data)
except (TimeoutError, ConnectionResetError):
    pass
print(got, flush=True)
"""


def stranger_client(path: str) -> int:
    """Bytes a client running as `nobody` got from the socket at `path`."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, 0o666)  # as if the mode were wrong: the peer check must still refuse
    try:
        result = run_as_nobody(STRANGER_CLIENT, path)
    finally:
        os.chmod(path, mode)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_peer_policy_and_directory_rules():
    policy = PeerPolicy(frozenset({1000, 0}))
    assert policy.allows(0) and policy.allows(1000) and not policy.allows(NOBODY_UID)
    nogroup = PeerPolicy.for_service("nogroup")  # nobody's primary group on Debian
    assert {os.geteuid(), 0, NOBODY_UID} <= nogroup.uids and nogroup.gid == 65534
    assert PeerPolicy.for_service().uids == {os.geteuid(), 0}
    owners = frozenset({1000})
    assert directory_problem(1000, stat.S_IFDIR | 0o700, owners) is None
    assert directory_problem(1000, stat.S_IFDIR | 0o755, owners) is None
    assert directory_problem(1000, stat.S_IFDIR | 0o1770, owners) is None  # sticky
    assert "belongs to uid 0" in directory_problem(0, stat.S_IFDIR | 0o700, owners)
    problem = directory_problem(1000, stat.S_IFDIR | 0o777, owners)
    assert "writable by others and not sticky (mode 0777)" in problem
    problem = directory_problem(1000, stat.S_IFDIR | 0o770, owners)
    assert "writable by others and not sticky (mode 0770)" in problem


def _auth_metric(server: AuthServer, name: str) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
    lines = [line for line in text.read().decode().splitlines() if line.startswith(name + " ")]
    return lines[0].split()[1] if lines else ""


@pytest.mark.netns
def test_the_session_feed_refuses_another_uid_counted_and_logged(tmp_path):
    auth = AuthServer(str(tmp_path / "gw"))
    auth.add_user("alice", PASSWORD)
    auth.start()
    try:
        auth.login("alice", PASSWORD)
        assert stranger_client(auth.control_socket) == 0  # not one byte of gRPC
        assert _auth_metric(auth, "pushgate_auth_control_peers_refused_total") == "1.0"
        log = Path(auth.directory, "auth.log").read_text()
        assert f"refused a client, uid {NOBODY_UID}" in log
        listing = auth.feed().ListSessions(control_pb2.ListSessionsRequest(), timeout=10)
        assert len(listing.sessions) == 1  # our own uid still gets the feed
    finally:
        auth.stop()


@pytest.mark.netns
def test_a_member_of_the_control_group_is_let_through(tmp_path):
    auth = AuthServer(str(tmp_path / "gw"), init_args=("--control-group", "nogroup"))
    auth.start()
    try:
        assert stat.S_IMODE(os.stat(auth.control_socket).st_mode) == 0o660
        assert stranger_client(auth.control_socket) > 0  # gRPC answered it
        assert _auth_metric(auth, "pushgate_auth_control_peers_refused_total") == "0.0"
    finally:
        auth.stop()


@pytest.mark.netns
@pytest.mark.parametrize(
    ("owner", "mode", "problem"),
    [
        (NOBODY_UID, 0o700, f"it belongs to uid {NOBODY_UID}"),
        (0, 0o777, "it is writable by others and not sticky (mode 0777)"),
    ],
)
def test_an_unsafe_socket_directory_is_a_start_up_error(tmp_path, owner, mode, problem):
    auth = AuthServer(str(tmp_path / "gw"))
    run = os.path.join(auth.directory, "run")
    os.chown(run, owner, -1)
    os.chmod(run, mode)
    try:
        result = subprocess.run(
            [os.path.join(BIN, "pushgate-auth"), "--config", auth.config],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("pushgate-auth started with an unsafe control socket directory")
    assert result.returncode == 2
    assert f"will not serve a control socket in {run}: {problem}" in result.stderr


@pytest.mark.netns
def test_the_dataplane_stats_socket_refuses_another_uid_counted(tmp_path):
    path = str(tmp_path / "run" / "dataplane.sock")
    counters = Counters()

    async def scenario():
        server = await serve_stats(Registry(), counters, path, PeerPolicy.for_service())
        try:
            got = await asyncio.to_thread(stranger_client, path)
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                listing = await control_pb2_grpc.DataplaneStatsStub(channel).ListSessionStats(
                    control_pb2.ListSessionStatsRequest(), timeout=10
                )
        finally:
            await server.stop(1)
        return got, listing

    got, listing = asyncio.run(scenario())
    assert got == 0
    assert counters.control_peers_refused == {"stats": 1, "feed": 0}
    assert list(listing.sessions) == []  # root (our uid) is served


@pytest.mark.netns
def test_the_dataplane_refuses_a_session_feed_served_by_another_uid(tmp_path, caplog):
    directory = tmp_path / "stranger"
    directory.mkdir()
    os.chmod(directory, 0o777)  # where nobody can bind a socket
    path = str(directory / "control.sock")
    counters = Counters()
    registry = Registry()

    async def scenario():
        with directories_opened(os.path.dirname(path)):
            stranger = await asyncio.create_subprocess_exec(
                *AS_NOBODY,
                NOBODY_PYTHON,
                "-c",
                STRANGER_SERVER,
                path,
                cwd="/",
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert await asyncio.wait_for(stranger.stdout.readline(), 20) == b"listening\n"
                sync = SessionSync(registry, counters, path)
                task = asyncio.create_task(sync.run())
                deadline = time.monotonic() + 10
                while not counters.control_peers_refused["feed"]:
                    assert time.monotonic() < deadline, "the stranger's feed was not refused"
                    await asyncio.sleep(0.05)
                received = int(await asyncio.wait_for(stranger.stdout.readline(), 20))
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            finally:
                if stranger.returncode is None:
                    stranger.kill()
                await stranger.wait()
        return received

    received = asyncio.run(scenario())
    assert received == 0  # gRPC's first bytes never reached the stranger
    assert counters.control_peers_refused["feed"] >= 1
    assert counters.control_connected == 0 and not registry.by_id
    assert f"refused the server at {path}, uid {NOBODY_UID}" in caplog.text
