"""List a dataset once into a Parquet inventory and give every image a stable shard.

A shard depends only on the path and the shard count, so new images never move old
ones and a partition's work stays the same across re-inventories.
"""

from __future__ import annotations

import json
import os
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from normals_pipeline import manifest
from normals_pipeline.storage import Storage

DEFAULT_SHARDS = 16
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
INVENTORY_PATH = "inventory/inventory.parquet"
SKIPPED_NAMES_KEY = "normals_pipeline.skipped_non_utf8_names"  # kept for `skipped_names` and older readers
SKIPPED_KEY = "normals_pipeline.skipped"  # JSON {reason: count}: the storage's SKIP_REASONS and NON_UTF8_NAME
NON_UTF8_NAME = "non_utf8_name"  # a local name that is not valid UTF-8: no Parquet string can hold it
SHARDS_KEY = "normals_pipeline.shards"
INVENTORY_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),  # null where the listing does not give it (a local folder): see `with_versions`
        pa.field("version", pa.string()),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)


class InventoryMissing(FileNotFoundError):
    """The inventory has not been written to this output yet."""


class InventoryMismatch(ValueError):
    """The inventory was taken with another shard count than the pipeline's."""


class OutputInsideDataset(ValueError):
    """An output inside the dataset would feed the pipeline its own normal maps."""


def count_from_env(name: str, default: int, most: int = 10_000) -> int:
    """A whole number from 1 to `most` in the environment variable `name`, read when the definitions load."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not 1 <= value <= most:
        raise ValueError(f"{name} must be between 1 and {most}, got {value}")
    return value


def shard_count_from_env() -> int:
    """`NORMALS_SHARDS`: the partition set is part of the code location."""
    return count_from_env("NORMALS_SHARDS", DEFAULT_SHARDS)


def _check_shards(shards: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")


def _shard(path: str, shards: int) -> int:
    return zlib.crc32(path.encode("utf-8")) % shards


def shard_of(path: str, shards: int) -> int:
    """CRC-32 of the UTF-8 path: stable across processes and versions (unlike `hash()`), and cheap
    enough to compute for every file of a large listing."""
    _check_shards(shards)
    return _shard(path, shards)


def partition_key(shard: int, shards: int) -> str:
    _check_shards(shards)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    return f"{shard:0{max(2, len(str(shards - 1)))}d}"


def partition_keys(shards: int) -> list[str]:
    """Zero-padded so keys sort like numbers, e.g. 16 -> ['00', ..., '15']."""
    _check_shards(shards)
    return [partition_key(shard, shards) for shard in range(shards)]


def take_inventory(storage: Storage, shards: int) -> pa.Table:
    """Image files under `storage`, one row each, in listing order, built column-wise for speed.

    Size and version are what the store's listing gives for free (S3: size and ETag; a local folder:
    nothing: `with_versions` stats them, once, in the inventory asset), so a listing costs little more than walking
    the names.
    Image names left out (FIFOs, sockets, devices, bad symlinks, names that are not UTF-8, S3 keys with
    an empty or dot part) are counted by reason in the schema metadata: see `skipped_entries`.
    """
    _check_shards(shards)
    listing = storage.listing(IMAGE_SUFFIXES)
    paths, sizes, versions = listing.paths, listing.sizes, listing.versions
    try:
        shard_ids = [zlib.crc32(path.encode()) % shards for path in paths]  # `_shard`, inlined: the hot loop
        unnamable = 0
    except UnicodeEncodeError:  # a local name that is not UTF-8: no Parquet string can hold it
        keep = [i for i, path in enumerate(paths) if _encodable(path)]
        unnamable = len(paths) - len(keep)
        paths, sizes, versions = ([column[i] for i in keep] for column in (paths, sizes, versions))
        shard_ids = [_shard(path, shards) for path in paths]
    skipped = dict(listing.skipped)
    if unnamable:
        skipped[NON_UTF8_NAME] = unnamable
    schema = INVENTORY_SCHEMA.with_metadata(
        {
            SKIPPED_NAMES_KEY: str(unnamable),
            SKIPPED_KEY: json.dumps(skipped, sort_keys=True),
            SHARDS_KEY: str(shards),
        }
    )
    return pa.table([paths, sizes, versions, shard_ids], schema=schema)


NOT_A_REGULAR_FILE = "not-a-regular-file"  # the version of a name swapped since the listing: its row says why


def with_versions(dataset: Storage, table: pa.Table) -> pa.Table:
    """The inventory with the size and version of every file the listing gave none (a local folder: one stat
    each, `Storage.stat_many`), as an S3 listing gives them: the asset stores it so, and the plan and the
    shard steps after it need no stat of their own. A file removed since the listing is left out; one that is
    no regular file any more gets `NOT_A_REGULAR_FILE`, and its row will say why."""
    versions = table["version"].to_pylist()
    todo = [index for index, version in enumerate(versions) if version is None]
    if not todo:
        return table
    paths, sizes = table["path"].to_pylist(), table["size"].to_pylist()
    keep = [True] * len(paths)
    for index, found in zip(todo, dataset.stat_many([paths[index] for index in todo])):
        if isinstance(found, FileNotFoundError):
            keep[index] = False
        elif isinstance(found, OSError):  # a FIFO, a link out or to nowhere
            sizes[index], versions[index] = 0, NOT_A_REGULAR_FILE
        else:
            sizes[index], versions[index] = found.size, found.version
    size_at, version_at = table.schema.get_field_index("size"), table.schema.get_field_index("version")
    table = table.set_column(size_at, table.schema.field(size_at), pa.array(sizes, pa.int64()))
    table = table.set_column(version_at, table.schema.field(version_at), pa.array(versions, pa.string()))
    return table if all(keep) else table.filter(pa.array(keep))


def refresh_inventory(dataset: Storage, output: Storage, shards: int) -> tuple[pa.Table, str]:
    """List the dataset, stat what the listing left unsized (once: the steps after need no stat), and write the
    inventory: the first step of every run, whichever shell runs it. Refuses an output inside the dataset
    (`OutputInsideDataset`) and a shard count other than the output's (`manifest.LayoutMismatch`)."""
    if (output.uri + "/").startswith(dataset.uri.rstrip("/") + "/"):
        raise OutputInsideDataset(
            f"the output {output.uri} lies inside the dataset {dataset.uri}: choose an output outside it"
        )
    manifest.check_layout(output, shards, lambda: inventory_shards(output))
    table = with_versions(dataset, take_inventory(dataset, shards))
    return table, write_inventory(output, table)


def _encodable(path: str) -> bool:
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def skipped_names(table: pa.Table) -> int:
    """How many image files were left out because their names are not valid UTF-8."""
    return int((table.schema.metadata or {}).get(SKIPPED_NAMES_KEY.encode(), b"0"))


def skipped_entries(table: pa.Table) -> dict[str, int]:
    """Image names the inventory left out, by reason (`fifo`, `socket`, `device`, `symlink_loop`,
    `symlink_outside`, `broken_symlink`, `not_a_file`, `non_utf8_name`; S3 keys: `empty_part`, `dot_part`):
    only reasons that occurred,
    so {} when nothing was skipped. An inventory from before these were counted gives its non-UTF-8 names."""
    metadata = table.schema.metadata or {}
    raw = metadata.get(SKIPPED_KEY.encode())
    if raw is not None:
        return {str(reason): int(count) for reason, count in json.loads(raw).items()}
    unnamable = skipped_names(table)
    return {NON_UTF8_NAME: unnamable} if unnamable else {}


def write_inventory(output: Storage, table: pa.Table) -> str:
    """Write atomically (one write_bytes) so readers see the old or the new inventory, never half."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    output.write_bytes(INVENTORY_PATH, sink.getvalue().to_pybytes(), "application/vnd.apache.parquet")
    return output.uri_for(INVENTORY_PATH)


def shards_taken_with(table: pa.Table) -> int:
    """The shard count an inventory was taken with (0 if it does not say)."""
    return int((table.schema.metadata or {}).get(SHARDS_KEY.encode(), b"0"))


def inventory_shards(output: Storage) -> int | None:
    """The count the output's current inventory was taken with, if it has one."""
    try:
        return shards_taken_with(read_inventory(output)) or None
    except InventoryMissing:
        return None


def read_inventory(output: Storage, shard: int | None = None, shards: int | None = None) -> pa.Table:
    """The whole inventory, or only the rows of one shard of `shards` (which must be the count the
    inventory was taken with: a different count puts images in other shards)."""
    try:
        data = output.read_bytes(INVENTORY_PATH)
    except FileNotFoundError as err:
        raise InventoryMissing(
            f"no inventory at {output.uri_for(INVENTORY_PATH)}: materialize the inventory asset first"
        ) from err
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as err:  # cut short or overwritten: taking it again is cheap and charges nothing
        raise InventoryMissing(
            f"the inventory at {output.uri_for(INVENTORY_PATH)} cannot be read ({err}): materialize the inventory "
            "asset again"
        ) from err
    taken_with = shards_taken_with(table)
    if shards is not None and taken_with != shards:
        raise InventoryMismatch(
            f"the inventory was taken for {taken_with} shards but the pipeline uses {shards}: "
            "materialize the inventory asset again"
        )
    return table if shard is None else table.filter(pc.equal(table["shard"], shard))
