"""The key never lands anywhere: runs with a canary key, then every byte they wrote is searched."""

import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

from normals_pipeline.emulator import Faults
from normals_pipeline.synthetic import make_portraits

CLI = str(Path(sys.executable).with_name("normals-pipeline"))


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_a_canary_key_appears_in_no_file_log_or_message(tmp_path, emulator_factory):
    canary = f"sk-canary-{uuid.uuid4().hex}"
    wrong = f"sk-canary-wrong-{uuid.uuid4().hex}"
    emulator = emulator_factory(
        keys={canary: Decimal(6)}, faults=Faults(error_rate=0.3, rate_limit_burst=2, retry_after=0.1, seed=5)
    )
    dataset = tmp_path / "in"
    make_portraits(dataset, 8)
    (dataset / "broken.png").write_bytes(b"\x89PNG not really")
    home, state = tmp_path / "dagster_home", tmp_path / "state"
    home.mkdir()
    outputs = []
    for key in (canary, wrong):  # a run that ends out of credits (402), and one whose key is refused (403)
        env = {**os.environ, "CLIPDROP_API_KEY": key, "DAGSTER_HOME": str(home), "NORMALS_STATE_DIR": str(state)}
        args = [CLI, "run", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--api-url", emulator.url]
        result = subprocess.run(
            args + ["--rpm", "6000", "--shards", "2"], env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 1  # both stop: credits gone, then key refused
        outputs.append(result.stdout + result.stderr)

    assert "no credits left" in outputs[0] or "no remaining credits" in outputs[0]
    assert "refused the API key" in outputs[1]
    for secret in (canary, wrong):
        assert not any(secret in text for text in outputs)
        for root in (tmp_path / "out", home, state):
            assert files_containing(root, secret.encode()) == [], f"{secret} leaked under {root}"
    assert any(home.rglob("*.db")), "the runs were recorded in the instance, and searched"
