"""The manifest's state on disk: corrupt files set aside (never blocking a shard), the journal's spool,
the recorded shard count, and the schema accepting every path the inventory accepts."""

import contextlib
import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pandas as pd
import pandera.pandas as pandera
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run as run_cli

from normals_pipeline import manifest
from normals_pipeline.cli import main
from normals_pipeline.enrich import Item, _row
from normals_pipeline.storage import LocalStorage, path_problem
from normals_pipeline.synthetic import make_portraits

IMAGES = 12


def run(dataset, output, url, shards="2"):
    return run_cli(dataset, output, url, "--shards", shards)  # the last --shards wins


@pytest.fixture
def enriched(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv("CLIPDROP_API_KEY", "test-key")
    make_portraits(tmp_path / "in", IMAGES)
    assert run(tmp_path / "in", tmp_path / "out", emulator.url) == 0
    return tmp_path / "in", tmp_path / "out"


def rows(output):
    return ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()


def test_a_truncated_manifest_is_set_aside_and_rebuilt_from_the_maps_without_a_charge(enriched, emulator, capsys):
    dataset, output = enriched
    target = output / manifest.partition_path("01")
    lost = len(pd.read_parquet(target))
    target.write_bytes(target.read_bytes()[:100])
    capsys.readouterr()

    assert run(dataset, output, emulator.url) == 0
    out = capsys.readouterr().out
    assert "could not be read" in out and "quarantine" in out
    assert len(list((output / "quarantine").rglob("manifest.parquet.*"))) == 1  # kept, not deleted
    table = rows(output)
    assert len(table) == IMAGES and table["path"].is_unique and table["error_code"].isna().all()
    assert Decimal(emulator.stats()["charged"]) == IMAGES  # nothing bought again
    rebuilt = table[table["partition"].astype(str) == "1"]
    assert len(rebuilt) == lost and rebuilt["credits_consumed"].isna().all()  # unknown, not a silent 0
    manifest.validate(pd.read_parquet(target))


def test_a_truncated_journal_file_is_set_aside_and_the_rerun_gives_one_row_per_image(enriched, emulator):
    dataset, output = enriched
    storage = LocalStorage(output)
    journal = manifest.Journal(storage, "00")
    previous = manifest.read_manifest(storage, "00")
    for record in previous.to_dict("records"):  # as a killed run would have left them
        journal.write({**record, "processed_at": record["processed_at"].to_pydatetime()})
    victim = sorted((output / "journal").rglob("*.jsonl"))[0]
    victim.write_bytes(victim.read_bytes()[:20])

    assert run(dataset, output, emulator.url) == 0
    assert len(list((output / "quarantine").rglob("*.jsonl.*"))) == 1
    assert not list((output / "journal").rglob("*.json*"))
    table = rows(output)
    assert len(table) == IMAGES and table["path"].is_unique
    assert Decimal(emulator.stats()["charged"]) == IMAGES


def test_journal_rows_the_output_refuses_go_to_the_spool_and_are_read_back(tmp_path):
    output, spool = LocalStorage(tmp_path / "out"), LocalStorage(tmp_path / "spool")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "journal").write_text("a file where the journal folder should be")
    journal = manifest.Journal(output, "00", spool=spool)
    row = _row(Item("a.jpg", 3, "v"), "0" * 64, uri=None)
    journal.write(row)
    assert spool.list_prefix("journal")
    rows, _ = journal.entries([])
    assert [row["path"] for row in rows] == ["a.jpg"]
    journal.clear()
    assert not spool.list_prefix("journal")


class SlowStorage(LocalStorage):
    """A local folder whose writes take as long as an S3 PUT across a network; `gate`, when given, is waited on
    by every write after the first `open_writes` (a process killed in the middle of a flush)."""

    def __init__(self, root, open_writes: int | None = None) -> None:
        super().__init__(root)
        self.writes = 0
        self.open_writes = open_writes
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def write_bytes(self, path, data, content_type=None):
        with self._lock:
            self.writes += 1
            held = self.open_writes is not None and self.writes > self.open_writes
        time.sleep(0.02)
        if held:
            self.gate.wait()
            raise OSError("killed")
        super().write_bytes(path, data, content_type)


def test_rows_written_at_once_by_many_workers_share_files_and_all_read_back(tmp_path):
    output = SlowStorage(tmp_path / "out")
    journal = manifest.Journal(output, "00", spool=LocalStorage(tmp_path / "spool"))
    paths = [f"img-{i:03}.jpg" for i in range(200)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda path: journal.write(_paid_row(path, 1.0), 1.0), paths))

    files = output.list_prefix("journal")
    assert len(files) == output.writes == len(journal.written) < len(paths) / 4
    rows, folded = manifest.Journal(output, "00").entries([])
    assert sorted(row["path"] for row in rows) == paths and [row["charged"] for row in rows] == [1.0] * len(paths)
    assert folded == journal.written


def test_a_run_killed_between_flushes_keeps_every_row_whose_write_returned(tmp_path):
    output = SlowStorage(tmp_path / "out", open_writes=3)  # the fourth write never completes: the kill
    journal = manifest.Journal(output, "00", spool=output)  # a spool that fails too: nothing else keeps them
    returned: list[str] = []

    def write(path: str) -> None:
        with contextlib.suppress(OSError):  # the killed write, once the test lets it end
            journal.write(_paid_row(path, 1.0), 1.0)
            returned.append(path)

    workers = [threading.Thread(target=write, args=(f"img-{i:03}.jpg",), daemon=True) for i in range(64)]
    for worker in workers:
        worker.start()
        time.sleep(0.001)
    time.sleep(0.3)  # every worker has returned or waits on the killed write
    done = sorted(returned)
    assert 0 < len(done) < 64
    state = manifest.load_shard(output, manifest.Journal(output, "00", spool=LocalStorage(tmp_path / "s")), "00")
    assert sorted(state.previous["path"]) == done  # the next run folds in exactly what was made durable
    output.gate.set()


def test_one_row_files_of_earlier_versions_are_folded_with_group_files(tmp_path):
    """A user upgrading mid-backfill: the journal holds files of one row each, then groups of the new run."""
    output, spool = LocalStorage(tmp_path / "out"), LocalStorage(tmp_path / "spool")
    old = {**_paid_row("a.jpg", 1.0), "charged": 1.0}
    name = f"journal/partition=00/{hashlib.sha256(b'a.jpg').hexdigest()[:32]}.0123456789ab.json"
    output.write_bytes(name, json.dumps({**old, "processed_at": old["processed_at"].isoformat()}).encode())
    manifest.Journal(output, "00", spool=spool).write(_paid_row("b.jpg", 2.0), 2.0)

    state = manifest.load_shard(output, manifest.Journal(output, "00", spool=spool), "00")
    assert state.previous.set_index("path")["credits_consumed"].to_dict() == {"a.jpg": 1.0, "b.jpg": 2.0}
    assert len(state.folded) == 2


def _paid_row(path: str, credits: float) -> dict:
    row = _row(Item(path, 3, "v"), "0" * 64, uri="file:///out/normals/00/x.jpg")
    return {**row, "credits_consumed": credits}


def test_two_writers_rows_for_one_path_both_count(tmp_path):
    """A lost claim let two runs write one shard: one paid for the content, the other found its map stored."""
    output, spool = LocalStorage(tmp_path / "out"), LocalStorage(tmp_path / "spool")
    payer, reuser = (manifest.Journal(output, "00", spool=spool) for _ in "ab")
    payer.write(_paid_row("a.jpg", 1.0), 1.0)
    reuser.write(_paid_row("a.jpg", 0.0), 0.0)  # later: its fields win, the cost is added
    state = manifest.load_shard(output, manifest.Journal(output, "00", spool=spool), "00")
    assert state.previous["credits_consumed"].tolist() == [1.0] and len(state.folded) == 2


def test_rows_a_manifest_holds_are_not_counted_again_when_their_journal_outlives_it(tmp_path, monkeypatch):
    """Killed between writing the manifest and clearing the journal: the next fold skips what it holds."""
    output, spool = LocalStorage(tmp_path / "out"), LocalStorage(tmp_path / "spool")
    journal = manifest.Journal(output, "00", spool=spool)
    state = manifest.load_shard(output, journal, "00")
    journal.write(_paid_row("a.jpg", 1.0), 1.0)
    monkeypatch.setattr(journal, "clear", lambda files=None: None)  # the crash
    built = manifest.with_journal(state.previous, [{**_paid_row("a.jpg", 1.0), "charged": 1.0}])
    manifest.commit_shard(output, journal, "00", state, built, lambda frame: frame)
    assert output.list_prefix("journal")
    again = manifest.load_shard(output, manifest.Journal(output, "00", spool=spool), "00")
    assert again.previous["credits_consumed"].tolist() == [1.0] and again.folded  # cleared by the next commit


def test_another_shard_count_on_an_enriched_output_is_refused_then_resharded(enriched, emulator, capsys):
    dataset, output = enriched
    capsys.readouterr()
    assert run(dataset, output, emulator.url, shards="3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "enriched with 2 shards, not 3" in err[0] and "reshard" in err[0]

    assert main(["reshard", "--output", str(output), "--shards", "3"]) == 0
    assert run(dataset, output, emulator.url, shards="3") == 0
    table = rows(output)
    assert len(table) == IMAGES and table["path"].is_unique
    assert Decimal(emulator.stats()["charged"]) == IMAGES == Decimal(str(table["credits_consumed"].sum()))


@pytest.mark.parametrize("path", ["a\\\\b.jpg", "back\\slash/x.png", "ü ñ/space name.webp", "dir/.x/y.jpg"])
def test_the_schema_accepts_every_path_the_inventory_accepts(path):
    manifest.validate(manifest.to_frame([_row(Item(path, 3, "v"), "0" * 64, uri="file:///m.jpg")]))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="a./\\ é\n", min_size=0, max_size=8))
def test_the_schema_accepts_a_path_exactly_when_a_listing_can_yield_it(path):
    """A listing leaves out what `path_problem` names (counted as skipped), so no listed key can fail a run's
    schema check, and no path a listing could not yield passes it."""
    frame = manifest.to_frame([_row(Item(path, 3, "v"), "0" * 64, uri="file:///m.jpg")])
    if path_problem(path) is None:
        manifest.validate(frame)
    else:
        with pytest.raises(pandera.errors.SchemaErrors):
            manifest.validate(frame)


def test_the_documented_reads_give_the_partition_as_the_key_the_ui_shows(enriched):
    """`partition` is the shard's key as a string ('01'), so filtering by the UI's key works in every reader."""
    import duckdb
    import polars as pl

    _, output = enriched
    keys = set(manifest.manifest_keys(LocalStorage(output)))
    key = min(keys)
    dataset = ds.dataset(str(output / "manifest"), partitioning=manifest.PARTITIONING)
    assert set(dataset.to_table()["partition"].to_pylist()) == keys
    assert dataset.to_table(filter=ds.field("partition") == key).num_rows
    files = f"{output}/manifest/*/*.parquet"
    read = f"read_parquet('{files}', hive_partitioning=true, hive_types={{'partition': VARCHAR}})"
    found = duckdb.sql(f"SELECT DISTINCT partition FROM {read}").fetchall()
    assert {row[0] for row in found} == keys
    frame = pl.scan_parquet(files, hive_partitioning=True, hive_schema={"partition": pl.String})
    assert frame.filter(pl.col("partition") == key).collect().height


def _shard(rows: list[tuple[str, str | None]], dtypes: dict[str, str] | None = None) -> pd.DataFrame:
    """A shard's frame: (path, error code) per row, with `dtypes` changed (ones the schema refuses)."""
    frame = manifest.to_frame(
        [
            _row(Item(path, 3, "v"), hashlib.sha256(path.encode()).hexdigest(), uri=None if code else "file:///m.jpg")
            | {"error_code": code}
            for path, code in rows
        ]
    )
    return frame.astype(dtypes or {})


_shard_rows = st.lists(
    st.tuples(
        st.sampled_from(["a.jpg", "b.jpg", "c/d.png", "../up.jpg"]), st.sampled_from([None, "bad", "Not A Code"])
    ),
    max_size=4,
)
# A float width fails together too; an int32 size does not: concatenated with int64 sizes it becomes int64.
_wrong_dtypes = st.sampled_from([{}, {"width": "float64"}, {"size": "int32"}])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_shard_rows, _wrong_dtypes), min_size=1, max_size=4), st.integers(1, 12))
def test_shards_validated_together_fail_exactly_as_each_alone(shards, rows):
    """One validation for shards that pass together never hides a shard's failure: a bad path, code or dtype,
    a path twice in one shard, and the same path in two shards (each fine alone)."""
    frames = {f"{index:02d}": _shard(rows, dtypes) for index, (rows, dtypes) in enumerate(shards)}
    together = manifest.failure_cases_by(frames, rows)
    assert list(together) == list(frames)
    for key, frame in frames.items():
        alone = manifest.failure_cases(frame)
        assert together[key].reset_index(drop=True).astype(str).equals(alone.reset_index(drop=True).astype(str))


def test_shards_that_pass_are_validated_once_up_to_a_bound_of_rows(monkeypatch):
    calls = []
    validate = manifest.validate
    monkeypatch.setattr(manifest, "validate", lambda df: calls.append(len(df)) or validate(df))
    frames = {f"{index:02d}": _shard([(f"{index}/{n}.jpg", None) for n in range(3)]) for index in range(16)}
    assert all(not len(cases) for cases in manifest.failure_cases_by(frames).values())
    assert calls == [48]
    calls.clear()
    assert all(not len(cases) for cases in manifest.failure_cases_by(frames, rows=10).values())
    assert calls == [9, 9, 9, 9, 9, 3]
