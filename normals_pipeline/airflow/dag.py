"""`normals_dag`: the pipeline for one dataset as an Airflow DAG, from plain settings (what `normals_definitions`
is to Dagster): refresh_inventory >> enrich_shards (mapped over ranges of shards) >> validate_manifests >>
training_pairs, with the manifest and the training pairs as assets downstream DAGs can be scheduled on."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset

from ..inventory import DEFAULT_SHARDS, partition_keys, shard_count_from_env
from ..training import DEFAULT_SPLITS, MIN_PERSON_FRACTION
from .hooks import ClipdropHook
from .operators import (
    NormalsEnrichOperator,
    NormalsInventoryOperator,
    NormalsTrainingPairsOperator,
    NormalsValidateOperator,
)

DEFAULT_POOL = "clipdrop"
SHARDS_PER_TASK = 4  # one mapped task per 4 shards: 4 tasks of the default 16, each one stream of work


def asset_uri(output: str, below: str) -> str:
    """An asset URI under the output: `s3://...` as given, a folder as `file:///absolute/path`."""
    if "://" in output:
        return f"{output.rstrip('/')}/{below}"
    return Path(output).expanduser().resolve().joinpath(below).as_uri()


def shard_ranges(shards: int, per_task: int) -> list[list[str]]:
    """The partition keys in consecutive runs of `per_task`: what each mapped enrich task covers."""
    keys = partition_keys(shards)
    return [keys[start : start + per_task] for start in range(0, len(keys), per_task)]


def pool_for(clipdrop_conn_id: str) -> str:
    """One pool per key, named by its fingerprint (never the key): read from the connection or the environment
    when the DAG is parsed; `clipdrop` when no key is known there (the task still fails without one)."""
    try:
        return ClipdropHook(clipdrop_conn_id).settings().pool(DEFAULT_POOL)
    except Exception:  # no key where the DAG is parsed: one pool for the unknown key
        return DEFAULT_POOL


def normals_dag(
    dag_id: str,
    dataset: str,
    output: str,
    shards: int = DEFAULT_SHARDS,
    *,
    shards_per_task: int = SHARDS_PER_TASK,
    clipdrop_conn_id: str = ClipdropHook.default_conn_name,
    pool: str | None = None,
    training_pairs: bool = True,
    training_splits: Mapping[str, float] = DEFAULT_SPLITS,
    webdataset: bool = False,
    min_person_fraction: float = MIN_PERSON_FRACTION,
    keep_no_person: bool = False,
    export_layouts: Sequence[str] = (),
    schedule: Any = None,
    retries: int = 2,
    **dag_kwargs: Any,
) -> DAG:
    """The DAG; `pool`: the Airflow pool its enrich tasks share with every DAG on the key (create it with
    `airflow pools set NAME SLOTS DESCRIPTION`; default: named after the key's fingerprint). Pools cap tasks at
    once, not requests: the key's rate is kept by its shared guard, across Airflow and Dagster alike."""
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task must be >= 1, got {shards_per_task}")
    where = {"dataset_uri": dataset, "output_uri": output, "shards": shards}
    # Named by their URIs: the asset is the output's manifest, whichever DAG writes it (a name kept across a change
    # of output would leave Airflow with two URIs for one name, and it refuses the task).
    manifest_asset, pairs_asset = Asset(uri=asset_uri(output, "manifest")), Asset(uri=asset_uri(output, "training"))
    dag_kwargs.setdefault("start_date", datetime(2026, 1, 1, tzinfo=UTC))
    dag_kwargs.setdefault("catchup", False)
    dag_kwargs.setdefault("tags", ["normals_pipeline"])
    with DAG(dag_id, schedule=schedule, **dag_kwargs) as dag:
        inventory = NormalsInventoryOperator(task_id="refresh_inventory", clipdrop_conn_id=clipdrop_conn_id, **where)
        enrich = NormalsEnrichOperator.partial(
            task_id="enrich_shards",
            clipdrop_conn_id=clipdrop_conn_id,
            pool=pool or pool_for(clipdrop_conn_id),
            retries=retries,
            **where,
        ).expand(shard_keys=shard_ranges(shards, shards_per_task))
        validate = NormalsValidateOperator(task_id="validate_manifests", outlets=[manifest_asset], **where)
        inventory >> enrich >> validate
        if training_pairs:
            pairs = NormalsTrainingPairsOperator(
                task_id="training_pairs",
                outlets=[pairs_asset],
                splits=training_splits,
                webdataset=webdataset,
                min_person_fraction=min_person_fraction,
                keep_no_person=keep_no_person,
                export_layouts=export_layouts,
                **where,
            )
            validate >> pairs
    return dag


def normals_dag_from_env(dag_id: str = "normals_enrichment") -> DAG:
    """The DAG configured from the same variables as `definitions.py`: `NORMALS_DATASET`, `NORMALS_OUTPUT`,
    `NORMALS_SHARDS`, and the key's `CLIPDROP_*` (read by the hook when no connection is defined)."""
    return normals_dag(
        dag_id,
        dataset=os.environ["NORMALS_DATASET"],
        output=os.environ["NORMALS_OUTPUT"],
        shards=shard_count_from_env(),
    )
