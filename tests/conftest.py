import hashlib
import os

import pytest

from push_protocol.keys import KeyMaterial


@pytest.fixture
def key_material() -> KeyMaterial:
    return KeyMaterial(0, os.urandom(32), os.urandom(32), created_at=0.0)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the test session (netlab/postgres.py)."""
    from netlab.postgres import Postgres

    server = Postgres()
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres, request) -> str:
    """A fresh, empty database on that server for one test."""
    name = "t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    return postgres.create_database(name)
