"""The `normals-pipeline` command: exit codes, one-line errors, and the demo."""

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pandera.pandas as pandera
import pytest

from normals_pipeline import guards, manifest
from normals_pipeline.cli import _print_shard, main
from normals_pipeline.live import PlainView
from normals_pipeline.synthetic import make_portraits

CLI = Path(sys.executable).parent / "normals-pipeline"
NO_PROC = not Path("/proc/self").exists()


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


def test_the_inventorys_warnings_reach_the_console(dataset, tmp_path, emulator, monkeypatch, capsys):
    os.mkfifo(dataset / "pipe.png")  # listed by name, never read: the inventory skips it and says so
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url) == 0
    out = capsys.readouterr().out
    assert out.count("warning: entries skipped (fifo: 1)") == 1


def test_an_answer_that_trickles_ends_at_the_timeout_and_the_summary_counts_what_was_sent(
    dataset, tmp_path, fault_server, monkeypatch, capsys
):
    """200, then one byte every 0.3 s: `--timeout` is one deadline for each request's whole exchange."""
    server = fault_server("trickle", interval=0.3)
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    started = time.monotonic()
    assert run(dataset, tmp_path / "out", server.url, "--timeout", "1", "--no-training-pairs") == 0
    assert time.monotonic() - started < 120  # ends, not after the ~300 s each body would take
    out = capsys.readouterr().out
    assert "4 images, 0 enriched, errors: timeout: 4; 4 requests, 4 credits consumed" in out, out
    assert server.requests == server.charged == len(server.charged_by_content) == 4  # each sent once


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
    """With the default attempts: an API never reached is given up after a few seconds of tries, said once."""
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", "http://127.0.0.1:9") == 1
    err = capsys.readouterr().err
    assert "cannot reach the Clipdrop API at http://127.0.0.1:9 (ConnectError: " in err
    assert err.count("cannot reach") == 1


def assert_one_line(out: str, err: str, *expected: str) -> str:
    """Exactly one `normals-pipeline: ` line on stderr holding `expected`, and no stack trace anywhere."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normals-pipeline: "), err
    assert all(text in lines[0] for text in expected), lines[0]
    for stream in (out, err):
        assert "Traceback" not in stream and "Stack Trace" not in stream and "site-packages/dagster" not in stream
    return lines[0]


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--budget", "-1", "0 or more"),
        ("--budget", "nan", "finite"),
        ("--budget", "inf", "finite"),
        ("--budget", "lots", "number of credits"),
        ("--credit-floor", "-3", "0 or more"),
        ("--rpm", "0", "at least 1"),
        ("--concurrency", "0", "at least 1"),
        ("--max-attempts", "1.5", "whole number"),
        ("--timeout", "0", "above 0"),
        ("--timeout", "nan", "finite"),
        ("--timeout", "soon", "number of seconds"),
        ("--timeout", "600", "at most 110"),  # its turn on the key's rate (120 s) would lapse while it is out
        ("--shards", "10001", "between 1 and 10000"),
        ("--api-url", "not-a-url", "http:// or https://"),
        ("--api-url", "ftp://x", "http:// or https://"),
        ("--api-url", "http://", "http:// or https://"),
    ],
)
def test_bad_option_is_one_line_exit_2_before_anything_starts(
    dataset, tmp_path, emulator, monkeypatch, capsys, option, value, says
):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url, option, value) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.out, captured.err, f"argument {option}:", says, "normals-pipeline run --help")
    assert captured.out == ""  # not even "enriching ...": refused at parsing, so no request and no retry
    assert emulator.stats()["requests"] == 0
    assert not (tmp_path / "out").exists()


def test_bad_rpm_from_the_environment_is_refused_like_the_option(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    monkeypatch.setenv("CLIPDROP_RPM", "sixty")
    assert main(["run", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--api-url", emulator.url]) == 2
    assert_one_line(*capsys.readouterr(), "argument --rpm:", "'sixty'")


def test_missing_required_option_is_one_line(tmp_path, capsys):
    assert main(["run", "--output", str(tmp_path / "out")]) == 2
    assert_one_line(*capsys.readouterr(), "required: --dataset")


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normals-pipeline run") and "--refresh-balance" in out and "--verbose" in out


def test_resource_refuses_a_url_that_is_not_http():
    from pydantic import ValidationError

    from normals_pipeline.orchestration import ClipdropResource

    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        ClipdropResource(api_key="k", api_url="ftp://example.com")
    assert ClipdropResource(api_key="k", api_url="https://clipdrop-api.co").api_url == "https://clipdrop-api.co"


def _locations(where: str, dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(dataset, output) for a location problem; the nested output is spelled through a symlink, so only
    resolved paths show that it lies inside the dataset."""
    if where == "missing dataset":
        return tmp_path / "missing", tmp_path / "out"
    if where == "output inside the dataset":
        (tmp_path / "alias").symlink_to(dataset)
        return dataset, tmp_path / "alias" / "enriched"
    if where == "output is a file":
        (tmp_path / "a-file").write_text("")
        return dataset, tmp_path / "a-file"
    return dataset, Path("/proc/normals-pipeline-test")


@pytest.mark.parametrize(
    "where, says",
    [
        ("missing dataset", "dataset not found"),
        ("output inside the dataset", "lies inside the dataset"),
        pytest.param("output not writable", "not a writable folder", marks=pytest.mark.skipif(NO_PROC, reason="/proc")),
        ("output is a file", "not a writable folder"),
    ],
)
def test_location_that_cannot_work_is_one_line_exit_2(dataset, tmp_path, emulator, monkeypatch, capsys, where, says):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(*_locations(where, dataset, tmp_path), emulator.url) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.out, captured.err, says)
    assert captured.out == "" and "dagster" not in captured.err.lower()
    assert emulator.stats()["requests"] == 0
    assert not (dataset / "enriched").exists()


def test_s3_output_inside_an_s3_dataset_is_one_line_exit_2_with_no_s3_request(emulator, monkeypatch, capsys):
    """Only the URIs are compared up front: no client, no credentials, no round trip."""
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a request would fail otherwise
    assert run("s3://bucket/portraits", "s3://bucket/portraits/enriched", emulator.url) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.out, captured.err, "lies inside the dataset")
    assert emulator.stats()["requests"] == 0


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(NO_PROC, reason="needs /proc for an unwritable output")
def test_installed_command_prints_one_line_on_real_stderr(dataset, tmp_path, emulator):
    """The console script, not `main()`: what Dagster, logging or warnings print bypasses capsys."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "PYTHONWARNINGS")}
    env["CLIPDROP_API_KEY"] = "test-key"
    common = ["--api-url", emulator.url, "--rpm", "100000", "--shards", "2"]
    cases = {
        "dataset not found": ["--dataset", str(tmp_path / "missing"), "--output", str(tmp_path / "out")],
        "lies inside the dataset": ["--dataset", str(dataset), "--output", str(dataset / "out")],
        "not a writable folder": ["--dataset", str(dataset), "--output", "/proc/normals-pipeline-test"],
    }
    for says, args in cases.items():
        done = _cli(env, "run", *args, *common)
        assert done.returncode == 2, done.stderr
        assert_one_line(done.stdout, done.stderr, says)
    key_refused = ["--dataset", str(dataset), "--output", str(tmp_path / "out")]
    refused = _cli({**env, "CLIPDROP_API_KEY": "sk-canary-7f3e"}, "run", *key_refused, *common)
    assert refused.returncode == 1
    assert_one_line(refused.stdout, refused.stderr, "refused the API key")
    assert "canary" not in refused.stdout + refused.stderr


def test_verbose_shows_dagster_log_and_traces(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "sk-wrong")
    assert run(dataset, tmp_path / "quiet", emulator.url) == 1
    quiet = capsys.readouterr()
    assert len(quiet.err.strip().splitlines()) == 1
    assert run(dataset, tmp_path / "loud", emulator.url, "--verbose") == 1
    loud = capsys.readouterr().err
    assert "STEP_FAILURE" in loud and "Stack Trace" in loud
    assert loud.strip().splitlines()[-1].startswith("normals-pipeline: run stopped: Clipdrop refused the API key")


def test_failed_manifest_check_names_the_shard_and_exits_1(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    short_paths = pandera.DataFrameSchema({"path": pandera.Column(str, pandera.Check.str_length(max_value=3))})
    monkeypatch.setattr(manifest, "MANIFEST_SCHEMA", short_paths)
    assert run(dataset, tmp_path / "out", emulator.url) == 1
    captured = capsys.readouterr()
    line = assert_one_line(captured.out, captured.err, "see the Dagster event log")
    assert line.startswith(
        "normals-pipeline: the manifest of shard 01 failed the manifest_schema check (4 failures, first:"
    )
    assert "path str_length" in line and "done in" not in captured.out


def test_refresh_balance_forgets_the_stored_balance_before_the_run(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    forgotten = []
    monkeypatch.setattr(guards, "forget_balance", lambda key, redis_url=None: forgotten.append((key, redis_url)))
    assert run(dataset, tmp_path / "plain", emulator.url) == 0
    assert forgotten == []
    assert run(dataset, tmp_path / "out", emulator.url, "--refresh-balance") == 0
    assert forgotten == [("test-key", None)]
    assert "4 enriched" in capsys.readouterr().out


def test_a_shard_prints_only_its_warnings_one_per_line(capsys):
    """A shard's figures are in the live view and the summary; a line per shard would look like success."""
    metadata = {"images": 2, "enriched": 2, "warnings": ["manifest quarantined", "journal unreadable"]}
    _print_shard(PlainView(60, sys.stdout), metadata)
    assert capsys.readouterr().out.splitlines() == ["  warning: manifest quarantined", "  warning: journal unreadable"]


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CLIPDROP_API_KEY", raising=False)
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "the emulator charged 3 credits in all" in out
    assert (tmp_path / "demo" / "enriched" / "contact_sheet.png").stat().st_size > 0
    assert "training pairs: 3 (" in out and "datasets.load_dataset(" in out and "NormalsDataset(" in out
    assert list((tmp_path / "demo" / "enriched" / "training" / "parquet").glob("partition=*/*.parquet"))


def test_refresh_balance_that_cannot_reach_the_state_is_one_line_exit_2(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")

    def unreachable(key, redis_url=None):
        raise ConnectionError("Error 111 connecting to localhost:6379. Connection refused.")

    monkeypatch.setattr(guards, "forget_balance", unreachable)
    assert run(dataset, tmp_path / "out", "http://127.0.0.1:9", "--refresh-balance") == 2
    assert_one_line(*capsys.readouterr(), "cannot refresh the stored balance: ConnectionError")


def test_after_a_top_up_the_refusal_says_when_and_refresh_balance_goes_at_once(
    dataset, tmp_path, emulator_factory, monkeypatch, capsys
):
    from decimal import Decimal

    emulator = emulator_factory(keys={"test-key": Decimal(2)})
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url, "--concurrency", "1") == 1  # 2 of 4, then 402
    capsys.readouterr()
    emulator.top_up("test-key", Decimal(10))

    assert run(dataset, tmp_path / "out", emulator.url) == 1  # the stored balance is still 0, and fresh
    err = capsys.readouterr().err
    assert "balance was 0 when last reported" in err and "--refresh-balance" in err
    assert len(err.strip().splitlines()) == 1

    assert run(dataset, tmp_path / "out", emulator.url, "--refresh-balance") == 0
    assert Decimal(emulator.stats()["charged"]) == 4


def test_run_builds_training_pairs_by_default_and_not_with_the_flag(dataset, tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url, "--splits", "1,0,0", "--webdataset") == 0
    out = capsys.readouterr().out
    assert "training pairs: 4 (train 4, validation 0, test 0), left out: none" in out
    assert len(list((tmp_path / "out" / "training" / "parquet").glob("partition=*/train-*.parquet"))) >= 1
    assert list((tmp_path / "out" / "training" / "webdataset").glob("*.tar"))

    assert run(dataset, tmp_path / "off", emulator.url, "--no-training-pairs") == 0
    assert "training pairs" not in capsys.readouterr().out
    assert not (tmp_path / "off" / "training").exists()


def test_export_writes_a_layout_from_the_pairs_and_a_rerun_writes_nothing(
    dataset, tmp_path, emulator, monkeypatch, capsys
):
    """A photo of no one (a flat map) is left out of the pairs, so of the layout; export sends nothing."""
    from PIL import Image

    Image.new("RGB", (320, 240), (120, 140, 160)).save(dataset / "blank.jpg")
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", emulator.url) == 0
    assert "left out: no_person: 1" in capsys.readouterr().out
    requests = emulator.stats()["requests"]
    out = tmp_path / "out"

    assert main(["export", "--output", str(out), "--layout", "sapiens"]) == 0
    written = capsys.readouterr().out
    assert f"sapiens (opencv): 4 samples, 13 files written, 0 deleted; {out}/training/sapiens/" in written
    assert len(list((out / "training" / "sapiens").glob("*/normals/*.npy"))) == 4
    assert main(["export", "--output", str(out), "--layout", "sapiens"]) == 0
    assert "sapiens (opencv): 4 samples, unchanged" in capsys.readouterr().out
    assert main(["export", "--output", str(out), "--layout", "dsine", "--convention", "opengl"]) == 0
    assert "dsine (opengl): 4 samples" in capsys.readouterr().out
    assert emulator.stats()["requests"] == requests  # no request

    assert main(["export", "--output", str(tmp_path / "none"), "--layout", "marigold"]) == 2
    assert "no training pairs under" in capsys.readouterr().err
    assert main(["export", "--output", str(out), "--layout", "hypersim"]) == 2
    assert "invalid choice: 'hypersim'" in capsys.readouterr().err


def test_bad_split_fractions_are_one_line_exit_2(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    assert run(dataset, tmp_path / "out", "http://127.0.0.1:9", "--splits", "0.5,0.6,0") == 2
    assert "split fractions must sum to 1" in capsys.readouterr().err


def test_demo_keeps_an_earlier_demo_and_fresh_deletes_only_a_demo(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--images", "3"]) == 0
    first = capsys.readouterr().out
    assert "not-really-a-photo.jpg: unreadable_image" in first  # refused files are listed
    assert main(["demo", "--workdir", str(workdir), "--images", "3"]) == 0
    again = capsys.readouterr().out
    assert "keeping the earlier demo" in again and "the emulator charged 0 credits in all" in again
    (workdir / "notes.txt").write_text("mine")
    assert main(["demo", "--workdir", str(workdir), "--fresh"]) == 2
    assert "holds more than a demo (notes.txt)" in capsys.readouterr().err
    assert (workdir / "notes.txt").exists() and (workdir / "portraits").is_dir()


@pytest.mark.parametrize("count", ["-3", "0", "many"])
def test_portraits_refuses_a_count_below_one(tmp_path, capsys, count):
    assert main(["portraits", str(tmp_path / "p"), "--count", count]) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.out, captured.err, "--count")
    assert not (tmp_path / "p").exists()


def test_portraits_seed_makes_other_bytes_and_the_same_seed_the_same(tmp_path, capsys):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["portraits", str(tmp_path / name), "--count", "2", "--seed", seed]) == 0
    content = {name: sorted(p.read_bytes() for p in (tmp_path / name).rglob("*.*")) for name in "abc"}
    assert content["a"] == content["b"] != content["c"]


def test_the_command_collects_nothing_while_it_loads_then_leaves_what_it_loaded_out(
    dataset, tmp_path, emulator, monkeypatch
):
    """`console` turns the collector off for the start-up; the run turns it back on before any work, with what
    start-up made frozen out of its passes. `main` alone (these tests) leaves the collector as it is."""
    from normals_pipeline import cli
    from normals_pipeline.orchestration import runner

    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    seen = []
    run_pipeline = runner.run_pipeline
    monkeypatch.setattr(
        runner,
        "run_pipeline",
        lambda *a, **k: seen.append((gc.isenabled(), gc.get_freeze_count())) or run_pipeline(*a, **k),
    )
    try:
        cli._starting.set()
        gc.disable()
        assert run(dataset, tmp_path / "out", emulator.url) == 0
        assert gc.isenabled() and seen[0][0] and seen[0][1] > 0
        gc.unfreeze()
        assert run(dataset, tmp_path / "again", emulator.url) == 0
        assert seen[1] == (True, 0)  # nothing frozen without `console`
    finally:
        cli._starting.clear()
        gc.unfreeze()
        gc.enable()
