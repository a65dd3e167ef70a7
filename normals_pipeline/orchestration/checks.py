"""Asset checks: every materialized shard's manifest is validated against the pandera schema, and every shard's
training pairs are looked at for maps a trainer should not trust (`normal_map_quality`, a warning).

The check is partitioned like the asset, so a run of one shard ties its result to the partition. Dagster
1.13 wants exactly one result per check from a step, and a step over a range of shards has no single
partition: such a run gives that one result for the range (its metadata and description name the shards)
and, besides it, one evaluation per shard tied to its partition, so every partition shows its own. Dagster
ties the range's result to the range's last materialization, so it carries no figures: a range-wide `rows`
would plot among that partition's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    MetadataValue,
    PartitionsDefinition,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from .. import manifest
from ._metadata import markdown_table

MANIFEST_CHECK = "manifest_schema"
QUALITY_CHECK = "normal_map_quality"


def manifest_check_spec(asset_key: AssetKey, partitions: PartitionsDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(
        MANIFEST_CHECK,
        asset=asset_key,
        description="The shard's manifest matches the pandera schema.",
        partitions_def=partitions,
    )


def _target(instance: DagsterInstance, asset_key: AssetKey, key: str) -> AssetCheckEvaluationTargetMaterializationData:
    """The partition's latest materialization: the UI counts a check result for a partition only when it
    points at it."""
    filter_ = AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key])
    [record] = instance.fetch_materializations(filter_, limit=1).records
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=record.event_log_entry.run_id, storage_id=record.storage_id, timestamp=record.timestamp
    )


def schema_failures(manifests: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Each shard's failure cases (`shard, column, check, failure_case`; empty when it passes), validated
    lazily, so every failing column and check is listed, not just the first; shards that pass in one
    validation (`manifest.failure_cases_by`)."""
    return {key: cases.assign(shard=key) for key, cases in manifest.failure_cases_by(manifests).items()}


def per_shard_evaluations(
    instance: DagsterInstance,
    asset_key: AssetKey,
    manifests: dict[str, pd.DataFrame],
    failures: dict[str, pd.DataFrame],
) -> list[AssetCheckEvaluation]:
    """One evaluation per shard, tied to its partition and its materialization (for a run over several
    shards, once they are materialized; see the module)."""
    if len(manifests) < 2:
        return []
    results = {key: check_manifests({key: df}, {key: failures[key]}) for key, df in manifests.items()}
    return evaluations_of(instance, asset_key, results)


def evaluations_of(
    instance: DagsterInstance, asset_key: AssetKey, results: Mapping[str, AssetCheckResult]
) -> list[AssetCheckEvaluation]:
    """Each shard's own result as an evaluation tied to its partition and its latest materialization."""
    return [
        AssetCheckEvaluation(
            asset_key=asset_key,
            check_name=result.check_name or "",
            passed=result.passed,
            metadata=result.metadata,
            severity=result.severity,
            description=result.description,
            partition=key,
            target_materialization_data=_target(instance, asset_key, key),
        )
        for key, result in results.items()
    ]


def range_result(manifests: dict[str, pd.DataFrame], failures: dict[str, pd.DataFrame]) -> AssetCheckResult:
    """The step's one result: a shard's own for a single shard, else the range's, without figures (see the
    module); its description still says how many rows or failures."""
    return check_manifests(manifests, failures, figures=len(manifests) < 2)


def check_manifests(
    manifests: dict[str, pd.DataFrame], failures: dict[str, pd.DataFrame] | None = None, figures: bool = True
) -> AssetCheckResult:
    """The check's result for these shards, naming the shards that fail; `failures` as `schema_failures`
    gives them (computed here when not given). `figures`: the counts as numeric metadata too."""
    failures = schema_failures(manifests) if failures is None else failures
    found = [cases for cases in failures.values() if len(cases)]
    shards = ", ".join(sorted(manifests))
    if not found:
        rows = sum(len(df) for df in manifests.values())
        return AssetCheckResult(
            check_name=MANIFEST_CHECK,
            passed=True,
            description=f"manifest of shard(s) {shards} matches the schema ({rows} rows)",
            metadata={**({"rows": rows} if figures else {}), "shards": shards},
        )
    cases = pd.concat(found, ignore_index=True)[["shard", "column", "check", "failure_case"]]
    first = cases.iloc[0]
    failing = ", ".join(sorted(cases["shard"].unique()))
    return AssetCheckResult(
        check_name=MANIFEST_CHECK,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        description=f"manifest of shard(s) {failing} fails the schema ({len(cases)} failures)",
        metadata={
            **({"failures": len(cases)} if figures else {}),
            "failing_shards": failing,
            "first_failure": f"{first['column']} {first['check']} on {first['failure_case']!r}",
            "failure_cases": MetadataValue.md(markdown_table(cases.head(20))),
            "shards": shards,
        },
    )


def quality_check_spec(asset_key: AssetKey, partitions: PartitionsDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(
        QUALITY_CHECK,
        asset=asset_key,
        description="No map of the shard shows no person, and none is far off the unit sphere (a warning: such "
        "maps are left out of the pairs, or kept by setting).",
        partitions_def=partitions,
    )


def check_quality(figures: Mapping[str, Mapping[str, Any]], numbers: bool = True) -> AssetCheckResult:
    """The quality check for these shards (`figures`: each shard's `training.quality_figures`). It warns when a
    map shows no person or is off the unit sphere by more than the bound. `numbers`: the counts and quantiles
    as metadata too (not for a range: see the module); the thresholds are always there."""
    no_person = sum(shard["no_person"] for shard in figures.values())
    above = sum(shard["unit_norm_above_bound"] for shard in figures.values())
    maps = sum(shard["maps"] for shard in figures.values())
    first = next(iter(figures.values()), {})
    metadata: dict[str, Any] = {
        "min_person_fraction": first.get("min_person_fraction"),
        "unit_norm_bound": first.get("unit_norm_bound"),
        "shards": ", ".join(sorted(figures)),
    }
    if numbers:
        quantiles = first.get("person_fraction_quantiles", {})
        metadata |= {"maps": maps, "no_person": no_person, "unit_norm_above_bound": above}
        metadata["person_fraction_quantiles"] = MetadataValue.json(quantiles)
        if quantiles:
            metadata["person_fraction_median"] = quantiles["p50"]
    passed = no_person == 0 and above == 0
    found = f"{no_person} with no person, {above} off the unit sphere by more than {first.get('unit_norm_bound')}"
    return AssetCheckResult(
        check_name=QUALITY_CHECK,
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        description=f"shard(s) {metadata['shards']}: {maps} maps, {found}",
        metadata=metadata,
    )
