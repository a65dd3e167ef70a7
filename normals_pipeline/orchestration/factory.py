"""`normals_definitions`: the pipeline for one dataset as `Definitions`, from plain settings.

This is the Python form of the Component (`normals_pipeline.SurfaceNormalsComponent`, which only resolves
YAML into a call of this function). Several datasets go into one code location with `Definitions.merge`,
each under its own `key_prefix`; they share one rate and credit guard per API key (the guards live in the
key's state, not in the definitions) and, by default, one Dagster pool per key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from dagster import Definitions, EnvVar

from ..client import DEFAULT_API_URL
from ..guards import key_fingerprint
from ..training import DEFAULT_SPLITS, MIN_PERSON_FRACTION
from .automation import Automation
from .definitions import DEFAULT_POOL, build_definitions
from .naming import STORAGE
from .partitions import DEFAULT_SHARDS, DEFAULT_SHARDS_PER_RUN, shard_count_from_env, shards_per_run_from_env
from .resources import ClipdropResource, DatasetResource

DEFAULT_KEY_ENV = "CLIPDROP_API_KEY"
DEFAULT_KEY = EnvVar(DEFAULT_KEY_ENV)


def pool_for(api_key: str | EnvVar) -> str:
    """One pool per key: `clipdrop` for the usual variable, else named by the variable or the key's
    fingerprint (never the key)."""
    if isinstance(api_key, EnvVar):
        name = api_key.env_var_name
        return DEFAULT_POOL if name == DEFAULT_KEY_ENV else f"{DEFAULT_POOL}_{name.lower()}"
    return f"{DEFAULT_POOL}_{key_fingerprint(api_key)}"


def normals_definitions(
    *,
    dataset: str | EnvVar,
    output: str | EnvVar,
    shards: int = DEFAULT_SHARDS,
    shards_per_run: int = DEFAULT_SHARDS_PER_RUN,
    api_key: str | EnvVar = DEFAULT_KEY,
    api_url: str = DEFAULT_API_URL,
    requests_per_minute: int = 60,
    concurrency: int | None = None,
    credit_floor: float = 0.0,
    run_budget: float | None = None,
    timeout_seconds: float = 60.0,
    redis_url: str | None = None,
    oversize: Literal["downscale", "refuse"] = "downscale",
    key_prefix: str | Sequence[str] | None = None,
    group: str = "normals",
    pool: str | None = None,
    sensor_enabled: bool = False,
    schedule_enabled: bool = False,
    schedule_cron: str = "0 2 * * *",
    training_pairs: bool = True,
    training_splits: Mapping[str, float] = DEFAULT_SPLITS,
    webdataset: bool = False,
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
    export_layouts: Sequence[str] = (),
    automation: Automation = "none",
    owners: Sequence[str] = (),
) -> Definitions:
    """The inventory, surface-normals and training-pairs assets, their check, jobs, sensor and schedule for one
    dataset. Pass the key as `EnvVar(...)`: a plain string would be shown in the UI's resource configuration.
    `training_splits`: fractions of `train`, `validation`, `test` (each >= 0, summing to 1); `webdataset`: also
    write the pairs as WebDataset tars; `min_person_fraction`: a map whose person covers less of it is left out
    of the pairs as `no_person` (the flat map the API returns when it finds no one), unless `keep_no_person`;
    `export_layouts`: trainers' layouts (sapiens, marigold, dsine) written from the pairs in the same runs.
    `automation`: `"eager"` (the dataset listed every minute) or `"on_cron"`
    (on `schedule_cron`) enriches new images with no sensor, running only their shards; `"none"` requests nothing.
    `owners`: emails or `team:name`, on every asset. Merge several with `merge_normals_definitions`, which refuses a
    shared output."""
    clipdrop = ClipdropResource(
        api_key=api_key,
        api_url=api_url,
        requests_per_minute=requests_per_minute,
        concurrency=concurrency,
        credit_floor=credit_floor,
        run_budget=run_budget,
        timeout_seconds=timeout_seconds,
        redis_url=redis_url,
        oversize=oversize,
    )
    return build_definitions(
        dataset_uri=dataset,
        output_uri=output,
        shards=shards,
        shards_per_run=shards_per_run,
        clipdrop=clipdrop,
        storage=DatasetResource(dataset_uri=dataset, output_uri=output),
        key_prefix=key_prefix,
        group=group,
        pool=pool or pool_for(api_key),
        sensor_enabled=sensor_enabled,
        schedule_enabled=schedule_enabled,
        schedule_cron=schedule_cron,
        training_pairs=training_pairs,
        training_splits=training_splits,
        webdataset=webdataset,
        min_person_fraction=min_person_fraction,
        keep_no_person=keep_no_person,
        export_layouts=export_layouts,
        automation=automation,
        owners=owners,
    )


def normalised_output(uri: str) -> str:
    """One spelling per place: an absolute resolved folder, or a URI without a trailing slash."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def refuse_shared_outputs(outputs: Iterable[tuple[str, str | EnvVar]]) -> None:
    """Two instances on one output would write each other's inventory and manifests under two partition sets:
    refused in one line naming both (`outputs`: (instance, output) pairs; an `EnvVar` is not known yet)."""
    seen: dict[str, str] = {}
    for instance, output in outputs:
        if isinstance(output, EnvVar):
            continue
        place = normalised_output(output)
        if place in seen:
            raise ValueError(
                f"the instances {seen[place]} and {instance} share the output {place}: give each its own output"
            )
        seen[place] = instance


def merge_normals_definitions(*defs: Definitions) -> Definitions:
    """`Definitions.merge`, refusing two datasets that write one output (named by their key prefixes)."""
    refuse_shared_outputs(
        (key.removesuffix(f"__{STORAGE}") if key != STORAGE else "(no key_prefix)", resource.output_uri)
        for each in defs
        for key, resource in (each.resources or {}).items()
        if isinstance(resource, DatasetResource)
    )
    return Definitions.merge(*defs)


def normals_definitions_from_env() -> Definitions:
    """The pipeline configured from the environment, as the repository's `definitions.py` and the cluster's
    `deploy/definitions.py` load it (the variables are listed in `definitions.py`)."""
    return normals_definitions(
        dataset=EnvVar("NORMALS_DATASET"),
        output=EnvVar("NORMALS_OUTPUT"),
        shards=shard_count_from_env(),
        shards_per_run=shards_per_run_from_env(),
        api_key=DEFAULT_KEY,
        api_url=os.environ.get("CLIPDROP_API_URL", DEFAULT_API_URL),
        requests_per_minute=int(os.environ.get("CLIPDROP_RPM", "60")),
        redis_url=os.environ.get("NORMALS_REDIS_URL"),
    )
