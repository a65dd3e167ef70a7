"""Asset checks: every materialized shard's manifest is validated against the pandera schema."""

from __future__ import annotations

import pandas as pd
import pandera.errors
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue

from .. import manifest
from ._metadata import markdown_table

MANIFEST_CHECK = "manifest_schema"


def manifest_check_spec(asset_key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(
        MANIFEST_CHECK, asset=asset_key, description="The shard's manifest matches the pandera schema."
    )


def check_manifests(manifests: dict[str, pd.DataFrame]) -> AssetCheckResult:
    """Validate each shard's manifest lazily, so the result lists every failing column and check (not just
    the first) and names the shards that fail. A run of one shard gets its result tied to the partition;
    a run over a range gets one result for the range (Dagster 1.13 evaluates a check once per step)."""
    failures = []
    for key, df in manifests.items():
        try:
            manifest.validate(df)
        except pandera.errors.SchemaErrors as errors:
            failures.append(errors.failure_cases[["column", "check", "failure_case"]].assign(shard=key))
    shards = ", ".join(sorted(manifests))
    if not failures:
        return AssetCheckResult(
            check_name=MANIFEST_CHECK,
            passed=True,
            metadata={"rows": sum(len(df) for df in manifests.values()), "shards": shards},
        )
    cases = pd.concat(failures, ignore_index=True)[["shard", "column", "check", "failure_case"]]
    first = cases.iloc[0]
    failing = ", ".join(sorted(cases["shard"].unique()))
    return AssetCheckResult(
        check_name=MANIFEST_CHECK,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        description=f"manifest of shard(s) {failing} fails the schema",
        metadata={
            "failures": len(cases),
            "failing_shards": failing,
            "first_failure": f"{first['column']} {first['check']} on {first['failure_case']!r}",
            "failure_cases": MetadataValue.md(markdown_table(cases.head(20))),
            "shards": shards,
        },
    )
