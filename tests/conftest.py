"""Shared fixtures: real servers on loopback (the emulator, moto's S3)."""

from _emulator_fixtures import *  # noqa: F401,F403
from _s3_fixtures import *  # noqa: F401,F403
