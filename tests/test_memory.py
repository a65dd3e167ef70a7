"""The run's freed image buffers go back to the OS: glibc's moving mmap threshold otherwise keeps them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from normals_pipeline import _memory

pytestmark = pytest.mark.skipif(not _memory._glibc(), reason="glibc's malloc only")

# One freed 8 MiB block (which raises glibc's threshold to 8 MiB), then 200 MiB in 1 MiB blocks and a smaller
# block after them on the heap, so the heap's top cannot shrink; RSS (MiB) before, at the peak and once freed.
_SCRIPT = """
import json, os, sys
from normals_pipeline._memory import return_freed_buffers
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
fixed = return_freed_buffers() if sys.argv[1] == "fix" else False
del [bytearray(8 << 20)][0]
before = rss()
blocks = [bytearray(1 << 20) for _ in range(200)]
pin = bytearray(64 << 10)
peak = rss()
del blocks
print(json.dumps({"fixed": fixed, "before": before, "peak": peak, "after": rss()}))
"""


def _rss(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != _memory.ENVIRONMENT} | env
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], env=clean, capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(done.stdout)


def test_freed_blocks_leave_the_process() -> None:
    figures = _rss("fix")
    assert figures["fixed"]
    assert figures["peak"] - figures["before"] >= 150
    assert figures["after"] - figures["before"] <= 30


def test_without_it_they_stay() -> None:
    """The control: what the fix is for (glibc raised its threshold and kept the blocks in its heap)."""
    figures = _rss("leave")
    assert figures["after"] - figures["before"] >= 150


def test_the_users_own_setting_wins() -> None:
    figures = _rss("fix", **{_memory.ENVIRONMENT: "4194304"})
    assert not figures["fixed"]
