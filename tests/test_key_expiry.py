"""Keys that are not replaced end their session; a rekey moves that end in both processes.

Found by the hostile suite: the rotation event did not carry the session's new
expiry, so the dataplane expired every session `key_expiry_seconds` (900 s by
default) after login even though the client had rekeyed, and the client was cut
off until the auth service expired the session too.
"""

import asyncio
import ipaddress

import pytest

from auth_service.sessions import AddressPool, SessionManager
from auth_service.store import Store
from dataplane.metrics import Counters
from dataplane.registry import Registry
from dataplane.sync import SessionSync
from netlab.feed import key_epoch, session
from pushgate_api import auth_pb2, control_pb2
from pushgate_io import gateway_config as config


def test_a_rotation_moves_the_dataplanes_expiry():
    registry = Registry()
    sync = SessionSync(registry, Counters(), "/nonexistent", clock=lambda: 1000.0)
    sync.counter_ranges.add(control_pb2.CounterRanges(first=1, count=10))
    sync.apply(
        control_pb2.SessionEvent(
            revision=1,
            installed=session(7, "198.19.0.2", key_epoch(0, 1000.0), expires_at=1900.0),
        )
    )
    assert registry.by_id[7].expires_at == 1900.0
    rotation = control_pb2.KeyRotation(
        session_id=7, keys=key_epoch(1, 1001.0), expires_at_unix_ms=2500_000
    )
    sync.apply(control_pb2.SessionEvent(revision=2, rotated=rotation))
    assert registry.by_id[7].expires_at == 2500.0
    unchanged = control_pb2.KeyRotation(session_id=7, keys=key_epoch(2, 1002.0))  # no new expiry
    sync.apply(control_pb2.SessionEvent(revision=3, rotated=unchanged))
    assert registry.by_id[7].expires_at == 2500.0


def test_the_auth_service_expires_unreplaced_keys_and_a_rekey_moves_the_expiry(tmp_path):
    async def scenario():
        network = ipaddress.ip_network("198.19.0.0/24")
        manager = SessionManager(
            Store(str(tmp_path / "db")),
            AddressPool(network, ipaddress.ip_address("198.19.0.1")),
            keepalive_seconds=10,
            session_lifetime_seconds=86400,
            key_expiry_seconds=8,
        )
        created, _, _ = await manager.create("alice", auth_pb2.CIPHER_SUITE_AES_256_GCM, 100.0)
        assert created.expires_at == 108.0
        rekeyed = await manager.rekey(created, 105.0)
        assert rekeyed.expires_at == 113.0
        event = manager.feed.events[-1]
        assert event.rotated.expires_at_unix_ms == 113_000  # the dataplane learns it too
        assert await manager.expire(112.9) == 0
        assert await manager.expire(113.0) == 1

    asyncio.run(scenario())


CONFIG = """
[gateway]
tunnel_network = "198.19.0.0/24"
gateway_address = "198.19.0.1"
[auth]
dataplane_endpoint = "198.18.0.1:51820"
"""


def _load(tmp_path, extra: str):
    path = tmp_path / "pushgate.toml"
    path.write_text(CONFIG + extra)
    return config.load(str(path), auth=True)


def test_key_lifetime_options(tmp_path):
    defaults = _load(tmp_path, "").auth
    assert (defaults.key_lifetime_seconds, defaults.key_expiry_seconds) == (600, 900)
    short = _load(tmp_path, "key_lifetime_seconds = 3\nkey_expiry_seconds = 8\n").auth
    assert (short.key_lifetime_seconds, short.key_expiry_seconds) == (3, 8)
    with pytest.raises(config.ConfigError, match="must be below key_expiry_seconds"):
        _load(tmp_path, "key_lifetime_seconds = 8\nkey_expiry_seconds = 8\n")
    with pytest.raises(config.ConfigError, match="key_expiry_seconds: 901"):
        _load(tmp_path, "key_expiry_seconds = 901\n")
