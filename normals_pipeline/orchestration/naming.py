"""Names of one dataset's Dagster objects, so several datasets live in one code location.

Without a prefix the names are the plain ones (`image_inventory`, `refresh_inventory`, resource `storage`, …).
With `key_prefix=["portraits"]` the assets are `portraits/image_inventory`, `portraits/surface_normals` and
`portraits/training_pairs`, and jobs, sensor, schedule and resource keys start with `portraits__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dagster import AssetKey

DATASET = "dataset"
DATASET_SHARDS = "dataset_shards"
INVENTORY = "image_inventory"
SURFACE_NORMALS = "surface_normals"
TRAINING_PAIRS = "training_pairs"
INVENTORY_JOB = "refresh_inventory"
SHARD_JOB = "enrich_shard"
SENSOR = "new_images_sensor"
SCHEDULE = "daily_inventory_schedule"
AUTOMATION_SENSOR = "automation_sensor"
STORAGE = "storage"
CLIPDROP = "clipdrop"


@dataclass(frozen=True)
class Names:
    prefix: tuple[str, ...] = ()

    @classmethod
    def of(cls, key_prefix: str | Sequence[str] | None) -> Names:
        parts = (key_prefix,) if isinstance(key_prefix, str) else tuple(key_prefix or ())
        for part in parts:
            if not part or not part.replace("_", "").isalnum():
                raise ValueError(f"key_prefix parts must be letters, digits and '_', got {part!r}")
        return cls(parts)

    def asset(self, name: str) -> AssetKey:
        return AssetKey([*self.prefix, name])

    def name(self, name: str) -> str:
        """A job, sensor, schedule or resource key: `<prefix joined by _>__<name>`."""
        return f"{'_'.join(self.prefix)}__{name}" if self.prefix else name
