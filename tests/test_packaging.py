"""The installed entry points and the generated gRPC code."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pushgate_api import auth_pb2, auth_pb2_grpc, control_pb2, control_pb2_grpc

SCRIPTS = ["pushgate-auth", "pushgate-admin", "pushgate-dataplane", "pushgate-client"]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_has_help(script):
    path = shutil.which(script, path=str(BIN)) or shutil.which(script)
    assert path, f"{script} is not installed"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert script in result.stdout


def test_generated_stubs_expose_the_apis():
    assert hasattr(auth_pb2_grpc, "AuthStub")
    assert hasattr(control_pb2_grpc, "SessionFeedStub")
    assert hasattr(control_pb2_grpc, "DataplaneStatsStub")
    rpcs = {m.name for m in auth_pb2.DESCRIPTOR.services_by_name["Auth"].methods}
    assert rpcs == {"Login", "Rekey", "Logout", "SessionInfo", "BeginSso", "Renew"}
    feed = control_pb2.DESCRIPTOR.services_by_name["SessionFeed"]
    assert {m.name for m in feed.methods} == {"ListSessions", "WatchSessions", "LeaseCounterRanges"}


def test_control_messages_round_trip():
    event = control_pb2.SessionEvent(
        revision=7,
        installed=control_pb2.Session(
            session_id=1,
            cipher=auth_pb2.CIPHER_SUITE_AES_256_GCM,
            tunnel_addresses=["198.19.0.2"],
            current_keys=auth_pb2.SessionKeys(
                key_epoch=0, client_to_server_key=b"a" * 32, server_to_client_key=b"b" * 32
            ),
        ),
    )
    parsed = control_pb2.SessionEvent.FromString(event.SerializeToString())
    assert parsed.WhichOneof("change") == "installed"
    assert parsed.installed.tunnel_addresses == ["198.19.0.2"]
