import os

import pytest

from push_protocol.keys import KeyMaterial


@pytest.fixture
def key_material() -> KeyMaterial:
    return KeyMaterial(0, os.urandom(32), os.urandom(32), created_at=0.0)
