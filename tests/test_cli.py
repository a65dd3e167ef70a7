"""The `normals-pipeline` command: exit codes, one-line errors, and the demo."""

import pytest

from normals_pipeline.cli import main
from normals_pipeline.synthetic import make_portraits


@pytest.fixture
def dataset(tmp_path):
    make_portraits(tmp_path / "in", 4)
    return tmp_path / "in"


def run(dataset, output, url, *extra):
    return main(
        [
            "run",
            "--dataset",
            str(dataset),
            "--output",
            str(output),
            "--api-url",
            url,
            "--rpm",
            "100000",
            "--shards",
            "2",
            *extra,
        ]
    )


def test_run_prints_a_summary_and_exits_0(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url) == 0
    out = capsys.readouterr().out
    assert "4 images, 4 enriched, errors: none; 4 requests, 4 credits consumed, 996 remaining" in out


def test_missing_key_is_one_line_and_exit_2(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)
    assert run(dataset, tmp_path / "out", emulator.url) == 2
    err = capsys.readouterr().err
    assert "CLIPDROP_API_KEY is not set" in err and len(err.strip().splitlines()) == 1
    assert emulator.stats()["requests"] == 0


def test_refused_key_exits_1_without_printing_it(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "sk-canary-7f3e")
    assert run(dataset, tmp_path / "out", emulator.url) == 1
    captured = capsys.readouterr()
    assert "refused the API key" in captured.err
    assert "canary" not in captured.out + captured.err


def test_unreachable_api_exits_1(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", "http://127.0.0.1:9", "--max-attempts", "2") == 1
    assert "cannot reach the Clipdrop API at http://127.0.0.1:9" in capsys.readouterr().err


def test_missing_dataset_exits_2(tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(tmp_path / "missing", tmp_path / "out", emulator.url) == 2
    assert "missing" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "the emulator charged 3 credits in all" in out
    assert (tmp_path / "demo" / "enriched" / "contact_sheet.png").stat().st_size > 0
