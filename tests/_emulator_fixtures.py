"""Fixtures that run the Clipdrop emulator on a free loopback port (star-imported by conftest)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from normals_pipeline.emulator import Emulator, EmulatorConfig

__all__ = ["emulator", "emulator_factory"]

TEST_KEY = "test-key"


def emulator_config(**overrides: Any) -> EmulatorConfig:
    """Generous defaults (1000 credits, no practical rate limit, no latency) so tests opt into limits."""
    return replace(EmulatorConfig(keys={TEST_KEY: Decimal(1000)}, rpm=100_000, latency=0.0), **overrides)


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with ``EmulatorConfig`` overrides (or a whole config); stop them at teardown."""
    started: list[Emulator] = []

    def start(config: EmulatorConfig | None = None, **overrides: Any) -> Emulator:
        emulator = Emulator(replace(config, **overrides) if config else emulator_config(**overrides)).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emulator(emulator_factory: Callable[..., Emulator]) -> Emulator:
    """A running emulator accepting ``test-key`` with 1000 credits."""
    return emulator_factory()


def kill_once_charged(emulator: Emulator, victim: subprocess.Popen, charged: int, timeout_s: float = 120) -> Decimal:
    """SIGKILL `victim`'s process group (started with `start_new_session=True`) once the emulator has charged
    `charged` images, others being in flight then; what had been charged when it was gone."""
    deadline = time.monotonic() + timeout_s
    while Decimal(emulator.stats()["charged"]) < charged and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    return Decimal(emulator.stats()["charged"])
