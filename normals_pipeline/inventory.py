"""List a dataset once into a Parquet inventory and give every image a stable shard.

A shard depends only on the path and the shard count, so new images never move old
ones and a partition's work stays the same across re-inventories.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from normals_pipeline.storage import Storage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
INVENTORY_PATH = "inventory/inventory.parquet"
SKIPPED_NAMES_KEY = "normals_pipeline.skipped_non_utf8_names"
INVENTORY_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)


class InventoryMissing(FileNotFoundError):
    """The inventory has not been written to this output yet."""


def is_candidate(path: str) -> bool:
    """True for image files by suffix (case-insensitive); a bare '.jpg' is a hidden file, not an image."""
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES


def _check_shards(shards: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")


def _shard(path: str, shards: int) -> int:
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def shard_of(path: str, shards: int) -> int:
    """blake2b, not hash(): Python's str hash is salted per process."""
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
    """Image files under `storage`, one row each, built column-wise for speed."""
    _check_shards(shards)
    paths: list[str] = []
    sizes: list[int] = []
    versions: list[str] = []
    shard_ids: list[int] = []
    unnamable = 0
    for entry in storage.walk():
        if is_candidate(entry.path):
            try:
                shard = _shard(entry.path, shards)
            except UnicodeEncodeError:  # a local name that is not UTF-8: no Parquet string can hold it
                unnamable += 1
                continue
            paths.append(entry.path)
            sizes.append(entry.size)
            versions.append(entry.version)
            shard_ids.append(shard)
    schema = INVENTORY_SCHEMA.with_metadata({SKIPPED_NAMES_KEY: str(unnamable)})
    return pa.table([paths, sizes, versions, shard_ids], schema=schema)


def skipped_names(table: pa.Table) -> int:
    """How many image files were left out because their names are not valid UTF-8."""
    return int((table.schema.metadata or {}).get(SKIPPED_NAMES_KEY.encode(), b"0"))


def write_inventory(output: Storage, table: pa.Table) -> str:
    """Write atomically (one write_bytes) so readers see the old or the new inventory, never half."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    output.write_bytes(INVENTORY_PATH, sink.getvalue().to_pybytes(), "application/vnd.apache.parquet")
    return output.uri_for(INVENTORY_PATH)


def read_inventory(output: Storage, shard: int | None = None) -> pa.Table:
    """The whole inventory, or only the rows of one shard."""
    try:
        data = output.read_bytes(INVENTORY_PATH)
    except FileNotFoundError as err:
        raise InventoryMissing(
            f"no inventory at {output.uri_for(INVENTORY_PATH)}: materialize the inventory asset first"
        ) from err
    table = pq.read_table(pa.BufferReader(data))
    return table if shard is None else table.filter(pc.equal(table["shard"], shard))
