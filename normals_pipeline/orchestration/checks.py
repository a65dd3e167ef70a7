"""Asset checks: every materialized shard's manifest is validated against the pandera schema."""

from __future__ import annotations

import pandas as pd
import pandera.errors
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from .. import manifest
from ._metadata import markdown_table

MANIFEST_CHECK = "manifest_schema"


def manifest_check_spec(asset_key: str) -> AssetCheckSpec:
    return AssetCheckSpec(
        MANIFEST_CHECK, asset=asset_key, description="The shard's manifest matches the pandera schema."
    )


def check_manifest(df: pd.DataFrame) -> AssetCheckResult:
    """Validate lazily so the result lists every failing column and check, not just the first."""
    try:
        manifest.validate(df)
    except pandera.errors.SchemaErrors as errors:
        cases = errors.failure_cases[["column", "check", "failure_case"]].head(20)
        first = cases.iloc[0]
        return AssetCheckResult(
            check_name=MANIFEST_CHECK,
            passed=False,
            severity=AssetCheckSeverity.ERROR,
            metadata={
                "failures": len(errors.failure_cases),
                "first_failure": f"{first['column']} {first['check']} on {first['failure_case']!r}",
                "failure_cases": MetadataValue.md(markdown_table(cases)),
            },
        )
    return AssetCheckResult(check_name=MANIFEST_CHECK, passed=True, metadata={"rows": len(df)})
