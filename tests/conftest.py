import hashlib
import logging
import os

import pytest

from push_protocol.keys import KeyMaterial


@pytest.fixture(autouse=True)
def root_logger_as_it_was():
    """A test that runs a command's main() in this process has it configure logging
    (pushgate_io.logs.configure: root at INFO, a handler on that test's captured
    stderr); left so, every later test formatted every INFO record into a stale
    stream (the client decision tests ran 10x slower after tests/test_admin.py)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


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
