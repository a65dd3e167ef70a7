"""The metadata the UI shows: the manifest's column schema (from the pandera schema) and a shard's
visual preview (images next to their normal maps, as Markdown with inline thumbnails)."""

import base64
import io
import re
import threading
from datetime import UTC, datetime

import pytest
from dagster import MaterializeResult, TableSchema, asset, materialize
from PIL import ExifTags, Image

from normals_pipeline import manifest
from normals_pipeline.enrich import normal_map_path
from normals_pipeline.orchestration._metadata import (
    COLUMN_SCHEMA,
    PREVIEW_MAX_CHARS,
    PREVIEW_ROWS,
    THUMBNAIL_PX,
    column_schema_metadata,
    preview_metadata,
)
from normals_pipeline.storage import LocalStorage

DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)")


def jpeg(size: tuple[int, int], color=(200, 120, 90), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def row(path: str, *, map_uri: str | None = None, error: str | None = None, size=(40, 60), credits=1.0) -> dict:
    return {
        "path": path,
        "content_hash": "0" * 64,
        "size": 10,
        "source_version": "v",
        "width": size[0],
        "height": size[1],
        "preparation": None,
        "normal_map_uri": map_uri,
        "credits_consumed": credits if error is None else 0.0,
        "remaining_credits": 10.0,
        "http_status": 200 if error is None else None,
        "error_code": error,
        "error_message": None if error is None else "cannot identify image file: not a PNG, JPEG, WEBP or ...",
        "processed_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


def thumbnails(markdown: str) -> list[tuple[str, Image.Image]]:
    return [(alt, Image.open(io.BytesIO(base64.b64decode(data)))) for alt, data in DATA_URI.findall(markdown)]


@pytest.fixture
def stores(tmp_path):
    return LocalStorage(tmp_path / "dataset"), LocalStorage(tmp_path / "out put")  # a space: %-encoded URIs


def enriched(dataset, output, path: str, image: bytes, normal_map: bytes, digest: str) -> dict:
    dataset.write_bytes(path, image)
    output.write_bytes(normal_map_path(digest), normal_map)
    return row(path, map_uri=output.uri_for(normal_map_path(digest)))


def test_the_column_schema_is_the_pandera_schemas_with_descriptions():
    schema = column_schema_metadata()[COLUMN_SCHEMA]
    assert isinstance(schema, TableSchema)
    assert [column.name for column in schema.columns] == manifest.COLUMNS
    pandera_columns = manifest.MANIFEST_SCHEMA.columns
    for column in schema.columns:
        assert column.description, column.name
        assert column.type == str(pandera_columns[column.name].dtype)
        assert column.constraints.nullable == pandera_columns[column.name].nullable
        assert not any("lambda" in text for text in column.constraints.other), column
    by_name = {column.name: column for column in schema.columns}
    assert by_name["path"].constraints.unique
    assert by_name["path"].constraints.other == ["relative, no empty, '.' or '..' part"]
    assert by_name["processed_at"].type == "datetime64[ms, UTC]"
    assert schema.constraints.other == ["a success has a normal map and an error has none"]


def test_the_column_schema_is_valid_definition_metadata_and_raises_no_warning(recwarn):
    @asset(metadata=column_schema_metadata())
    def described() -> None: ...

    metadata = described.metadata_by_key[described.key]
    assert metadata[COLUMN_SCHEMA].columns[0].name == "path"
    assert not [w for w in recwarn if "beta" in str(w.message).lower()]


def test_the_preview_shows_each_image_next_to_its_normal_map(stores):
    dataset, output = stores
    rows = [
        enriched(dataset, output, f"p{i}.jpg", jpeg((300, 450)), jpeg((300, 450), (128, 128, 255)), f"{i:02x}" * 32)
        for i in range(3)
    ]
    markdown = preview_metadata(manifest.to_frame(rows), output, dataset).value
    assert markdown.splitlines()[0] == "| path | image | normal map | result |"
    shown = thumbnails(markdown)
    assert [alt for alt, _ in shown] == ["image", "normal map"] * 3
    for _, thumbnail in shown:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == THUMBNAIL_PX
        assert thumbnail.size == (64, 96)  # the aspect ratio kept
    assert "| p0.jpg |" in markdown and "40×60, 1 credit |" in markdown


def test_the_image_is_shown_as_sent_exif_orientation_applied(stores):
    dataset, output = stores
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 200 wide, shown (and sent) 200 tall
    rows = [enriched(dataset, output, "turned.jpg", jpeg((200, 100), exif=exif), jpeg((100, 200)), "ab" * 32)]
    (_, image), (_, normal_map) = thumbnails(preview_metadata(manifest.to_frame(rows), output, dataset).value)
    assert image.size == normal_map.size == (48, 96)


def test_successes_come_first_errors_show_their_code_and_missing_files_do_not_fail(stores):
    dataset, output = stores
    dataset.write_bytes("a-not-an-image.jpg", b"text, not a JPEG")
    rows = [
        row("a-not-an-image.jpg", error="unreadable_image"),
        row("gone.jpg", map_uri=output.uri_for(normal_map_path("cd" * 32))),  # neither file exists any more
        enriched(dataset, output, "ok|pipe].jpg", jpeg((50, 50)), jpeg((50, 50)), "ef" * 32),
    ]
    markdown = preview_metadata(manifest.to_frame(rows), output, dataset, rows=3).value
    lines = markdown.splitlines()[2:]
    assert lines[0].startswith("| gone.jpg | _image: FileNotFoundError_ | _normal map: FileNotFoundError_ |")
    assert lines[1].startswith(r"| ok\|pipe\].jpg | ![image](data:")  # a path cannot break the table
    assert lines[2].startswith("| a-not-an-image.jpg | _image: UnidentifiedImageError_ | — | `unreadable_image` |")
    assert "0x" not in DATA_URI.sub("", markdown)  # no memory address, e.g. from Pillow


def test_the_preview_takes_a_few_rows_and_stays_small(stores):
    dataset, output = stores
    rows = [
        enriched(dataset, output, f"big{i}.jpg", jpeg((3000, 4000), (i * 20, 90, 200)), jpeg((3000, 4000)), f"{i:064x}")
        for i in range(6)
    ]
    markdown = preview_metadata(manifest.to_frame(rows), output, dataset).value
    assert len(thumbnails(markdown)) == 8  # 4 rows of image | normal map
    assert markdown.endswith("4 of 6 rows; the whole shard is in the manifest.")
    assert len(markdown) < PREVIEW_MAX_CHARS


def test_a_preview_over_the_size_limit_drops_rows(stores, monkeypatch):
    dataset, output = stores
    rows = [enriched(dataset, output, f"p{i}.jpg", jpeg((90, 90)), jpeg((90, 90)), f"{i:064x}") for i in range(4)]
    one_row = len(preview_metadata(manifest.to_frame(rows[:1]), output, dataset).value)
    monkeypatch.setattr("normals_pipeline.orchestration._metadata.PREVIEW_MAX_CHARS", int(one_row * 2.5))
    markdown = preview_metadata(manifest.to_frame(rows), output, dataset).value
    assert len(thumbnails(markdown)) == 4 and markdown.endswith("2 of 4 rows; the whole shard is in the manifest.")


class _Meeting(LocalStorage):
    """Each read waits until `barrier`'s parties are all reading: reads one after another never meet."""

    def __init__(self, root, barrier: threading.Barrier) -> None:
        super().__init__(root)
        self.barrier = barrier

    def read_bytes(self, path: str) -> bytes:
        self.barrier.wait()
        return super().read_bytes(path)


def test_the_previews_reads_go_at_once(tmp_path):
    """On S3 each read is a round trip: a shard's eight (four images, four maps) are under way together."""
    barrier = threading.Barrier(2 * PREVIEW_ROWS, timeout=10)
    dataset, output = _Meeting(tmp_path / "dataset", barrier), _Meeting(tmp_path / "out", barrier)
    rows = [
        enriched(dataset, output, f"p{i}.jpg", jpeg((60, 90)), jpeg((60, 90)), f"{i:064x}") for i in range(PREVIEW_ROWS)
    ]
    markdown = preview_metadata(manifest.to_frame(rows), output, dataset).value
    assert [alt for alt, _ in thumbnails(markdown)] == ["image", "normal map"] * PREVIEW_ROWS
    assert not barrier.broken


def test_an_empty_shard_has_a_preview_too(stores):
    dataset, output = stores
    assert preview_metadata(manifest.empty_manifest(), output, dataset).value == "_no images in this shard_"


def test_the_preview_is_valid_materialization_metadata(stores):
    dataset, output = stores
    rows = [enriched(dataset, output, "p.jpg", jpeg((90, 90)), jpeg((90, 90)), "12" * 32)]

    @asset
    def previewed() -> MaterializeResult:
        return MaterializeResult(metadata={"preview": preview_metadata(manifest.to_frame(rows), output, dataset)})

    result = materialize([previewed])
    (materialization,) = result.asset_materializations_for_node("previewed")
    assert len(thumbnails(materialization.metadata["preview"].value)) == 2


def test_a_range_run_gives_each_partition_its_own_numeric_figures_and_no_range_totals(tmp_path, emulator_factory):
    """The UI plots a number across a partition's materializations: a run's total among them would be a spike."""
    import pyarrow.dataset as ds
    from dagster import AssetKey, DagsterEventType, DagsterInstance, IntMetadataValue

    from normals_pipeline.emulator import Faults
    from normals_pipeline.orchestration import ClipdropResource, build_definitions
    from normals_pipeline.orchestration.runner import run_pipeline
    from normals_pipeline.synthetic import make_portraits

    make_portraits(tmp_path / "in", 12)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    emulator = emulator_factory(faults=Faults(error_burst=3))  # 3 answers of 500: retried, sent again
    clipdrop = ClipdropResource(api_key="test-key", api_url=emulator.url, requests_per_minute=100_000)
    output = tmp_path / "out"
    defs = build_definitions(
        dataset_uri=str(tmp_path / "in"), output_uri=str(output), shards=4, clipdrop=clipdrop, training_pairs=False
    )
    instance = DagsterInstance.ephemeral()
    run_pipeline(defs, 4, instance)  # one run over the 4 shards

    df = ds.dataset(str(output / "manifest"), partitioning="hive").to_table().to_pandas()
    records = instance.fetch_materializations(AssetKey("surface_normals"), limit=100).records
    by_partition = {record.asset_materialization.partition: record.asset_materialization.metadata for record in records}
    assert set(by_partition) == {"00", "01", "02", "03"}
    for key, metadata in by_partition.items():
        shard = df[df["partition"] == int(key)]
        assert metadata["credits_consumed"].value == shard["credits_consumed"].sum()
        assert metadata["requests"].value >= shard["http_status"].notna().sum()
        assert isinstance(metadata["images_per_second"].value, float)
        errors = shard["error_code"].dropna().value_counts().to_dict()
        by_code = {name[len("errors/") :]: value for name, value in metadata.items() if name.startswith("errors/")}
        assert {code: value.value for code, value in by_code.items()} == errors
        assert all(isinstance(value, IntMetadataValue) for value in by_code.values())
    figures = by_partition.values()
    assert sum(metadata["requests"].value for metadata in figures) == emulator.stats()["requests"] == 12 + 3
    assert sum(sum(metadata["retries_by_code"].value.values()) for metadata in figures) == 3
    assert sum(metadata.get("errors/unreadable_image", IntMetadataValue(0)).value for metadata in figures) == 1

    run_id = records[0].event_log_entry.run_id
    checks = [
        entry.dagster_event.event_specific_data
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    ]
    [whole] = [evaluation for evaluation in checks if evaluation.partition is None]
    assert not [name for name, value in whole.metadata.items() if isinstance(value.value, int | float)]
    own = {evaluation.partition: evaluation.metadata["rows"].value for evaluation in checks if evaluation.partition}
    assert own == {key: int((df["partition"] == int(key)).sum()) for key in by_partition}
