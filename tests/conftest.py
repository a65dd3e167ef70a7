"""Shared fixtures: real servers on loopback (the emulator, a fault server, moto's S3, Redis)."""

import pytest
from _emulator_fixtures import *  # noqa: F401,F403
from _fault_servers import *  # noqa: F401,F403
from _s3_fixtures import *  # noqa: F401,F403
from _service_fixtures import *  # noqa: F401,F403


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """Each test its own shared-guard folder: a key's rate and cooldown must not leak between tests."""
    monkeypatch.setenv("NORMALS_STATE_DIR", str(tmp_path_factory.mktemp("state")))
