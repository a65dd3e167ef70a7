"""Operators, one task each, over the same core as the Dagster assets: refresh the inventory (and say what the run
will send and cost), enrich a range of shards (mapped with `.expand(shard_keys=...)`), validate the manifests
against the pandera schema, build the training pairs. Each emits what it did as the extra of its asset event."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import pandas as pd
from airflow.sdk import Asset, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from .. import manifest
from .._errors import ClipdropError, stop_message, stopped_line
from .._state import take_set_aside_warnings
from ..enrich import Progress, ShardResult, Throttle, items_by_shard
from ..export import build_shard, check_layout, finish_layout, layout_dir
from ..inventory import OutputInsideDataset, refresh_inventory, skipped_entries
from ..live import plain_number
from ..manifest import LayoutMismatch
from ..storage import Storage, open_storage
from ..training import (
    DEFAULT_SPLITS,
    MIN_PERSON_FRACTION,
    check_splits,
)
from .hooks import ClipdropHook


class _NormalsOperator(BaseOperator):
    """The dataset and output every task reads (folders or `s3://bucket/prefix`), and the shard count."""

    template_fields: Sequence[str] = ("dataset_uri", "output_uri")

    def __init__(self, *, dataset_uri: str, output_uri: str, shards: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset_uri, self.output_uri, self.shards = dataset_uri, output_uri, shards

    def storages(self) -> tuple[Storage, Storage]:
        return open_storage(self.dataset_uri), open_storage(self.output_uri)

    def emit(self, context: Context, extra: dict[str, Any]) -> None:
        """`extra` on the event of each of the task's outlet assets: what downstream DAGs read."""
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra


class NormalsInventoryOperator(_NormalsOperator):
    """Lists the dataset into the output's inventory, then logs the plan: images to send, credits, time."""

    def __init__(self, *, clipdrop_conn_id: str = ClipdropHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clipdrop_conn_id = clipdrop_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        dataset, output = self.storages()
        try:
            table, uri = refresh_inventory(dataset, output, self.shards)
        except (OutputInsideDataset, LayoutMismatch) as error:
            raise AirflowFailException(str(error)) from None
        if skipped := skipped_entries(table):
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
            self.log.warning("entries skipped (%s): only regular files with UTF-8 names are read", reasons)
        settings = ClipdropHook(self.clipdrop_conn_id).settings()
        plan = settings.plan(dataset, output, table, self.shards)
        for warning in [*take_set_aside_warnings(), *plan.warnings]:
            self.log.warning(warning)
        if shortfall := settings.shortfall(plan):
            self.log.warning(shortfall)
        total = plan.figures(plan.total)
        self.log.info(
            "%d images in %s (inventory %s): %d done, %d to send, %d duplicates, %d refused; "
            "up to %s credits (balance %s), about %s s at %d requests/min",
            table.num_rows,
            dataset.uri,
            uri,
            total["done"],
            total["to_send"],
            total["duplicates"],
            total["refused"],
            total["credits_needed"],
            "unknown" if total["balance"] is None else total["balance"],
            total["eta_seconds"],
            settings.requests_per_minute,
        )
        return total


class NormalsEnrichOperator(_NormalsOperator):
    """Enriches the shards `shard_keys` (partition keys, e.g. ["00", "01"]) as one stream of work, through the key's
    shared guards and claims: what another run or task already paid for is not sent again, so a retry of this
    task sends nothing twice. A stopped run (credits out, key refused, API unreachable) fails the task, without a
    retry, with the CLI's one line; every finished image is kept."""

    template_fields: Sequence[str] = ("dataset_uri", "output_uri", "shard_keys")

    def __init__(
        self, *, shard_keys: Sequence[str], clipdrop_conn_id: str = ClipdropHook.default_conn_name, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.shard_keys, self.clipdrop_conn_id = shard_keys, clipdrop_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        keys = sorted(self.shard_keys)
        dataset, output = self.storages()
        items = items_by_shard(dataset, output, keys, self.shards)
        settings = ClipdropHook(self.clipdrop_conn_id).settings()
        throttle = Throttle(seconds=30, fraction=0.1)

        def progress(done: Progress) -> None:
            if throttle.due(done) or done.done == done.total:
                self.log.info(done.line())

        def shard_done(key: str, result: ShardResult) -> None:
            for warning in result.warnings:
                self.log.warning(warning)
            credits = plain_number(result.credits_consumed)
            self.log.info("shard %s finished: %d rows written, %s credits", key, result.new_rows, credits)

        results = settings.enrich(
            dataset,
            output,
            [(key, items[key]) for key in keys],
            warn=self.log.warning,
            progress=progress,
            notify=self.log.info,
            on_shard=shard_done,
        )
        summary = shard_summary(results)
        self.emit(context, summary)
        stopped = [result.stopped for result in results.values() if result.stopped is not None]
        if stopped:
            line = stopped_line(stop_message(stopped[0], settings.api_url))
            self.log.error(line)
            if isinstance(stopped[0], ClipdropError):
                raise AirflowFailException(line)
            raise stopped[0]
        return summary


class NormalsValidateOperator(_NormalsOperator):
    """Validates every shard's manifest against the pandera schema (the Dagster check's), failing with the shards
    and checks that do not pass; its manifest event carries the output's figures."""

    def execute(self, context: Context) -> dict[str, Any]:
        _, output = self.storages()
        keys = manifest.manifest_keys(output)
        failures = {}
        frames = []
        for key in keys:
            frame = manifest.read_manifest(output, key, set_aside=False)
            frames.append(frame)
            cases = manifest.failure_cases(frame)
            if not cases.empty:
                failed = cases[["column", "check"]].drop_duplicates().itertuples(index=False)
                failures[key] = ", ".join(f"{column}: {check}" for column, check in failed)
        if failures:
            lines = "; ".join(f"shard {key}: {problems}" for key, problems in sorted(failures.items()))
            raise AirflowFailException(f"manifests failing the schema: {lines}")
        figures = manifest_figures(pd.concat(frames, ignore_index=True) if frames else manifest.empty_manifest())
        self.log.info("manifests of %d shards valid: %s", len(keys), figures)
        self.emit(context, figures)
        return figures


class NormalsTrainingPairsOperator(_NormalsOperator):
    """Each shard's enriched images next to their maps as training Parquet (kept when nothing changed), maps that
    show no person left out (unless `keep_no_person`), and the pairs in each of `export_layouts` (sapiens,
    marigold, dsine); the quality figures warn in the log, as the Dagster check does, and ride on the event."""

    def __init__(
        self,
        *,
        splits: Mapping[str, float] = DEFAULT_SPLITS,
        webdataset: bool = False,
        min_person_fraction: float = MIN_PERSON_FRACTION,
        keep_no_person: bool = False,
        export_layouts: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.splits, self.webdataset = check_splits(splits), webdataset
        self.min_person_fraction, self.keep_no_person = min_person_fraction, keep_no_person
        self.layouts = {layout: check_layout(layout) for layout in export_layouts}

    def execute(self, context: Context) -> dict[str, Any]:
        dataset, output = self.storages()
        pairs, left_out, splits, reused, no_person, off_sphere = 0, Counter[str](), Counter[str](), 0, 0, 0
        present = {layout: set(output.list_prefix(layout_dir(layout))) for layout in self.layouts}
        keys = manifest.manifest_keys(output)
        for key in keys:
            built = build_shard(
                dataset,
                output,
                key,
                warn=self.log.warning,
                splits=self.splits,
                webdataset=self.webdataset,
                min_person_fraction=self.min_person_fraction,
                keep_no_person=self.keep_no_person,
                layouts=self.layouts,
                present=present,
            )
            result, quality = built.pairs, built.quality
            if quality["no_person"] or quality["unit_norm_above_bound"]:
                self.log.warning("shard %s: normal_map_quality: %s", key, quality)
            pairs, reused = pairs + result.pairs, reused + result.reused
            no_person, off_sphere = no_person + quality["no_person"], off_sphere + quality["unit_norm_above_bound"]
            left_out.update(result.left_out)
            splits.update(result.splits)
        for layout, convention in self.layouts.items():
            finish_layout(output, layout, convention)
        extra = {
            "pairs": pairs,
            "left_out_by_reason": dict(left_out),
            "splits": dict(splits),
            "shards_reused": reused,
            "no_person": no_person,
            "unit_norm_above_bound": off_sphere,
            "layouts": sorted(self.layouts),
        }
        self.log.info("training pairs of %d shards: %s", len(keys), extra)
        self.emit(context, extra)
        return extra


def shard_summary(results: Mapping[str, ShardResult]) -> dict[str, Any]:
    """A task's figures over its shards (JSON-able: an asset event's extra, an XCom)."""
    errors: Counter[str] = Counter()
    for result in results.values():
        errors.update(result.errors)
    return {
        "shards": sorted(results),
        "images": sum(len(result.manifest) for result in results.values()),
        "enriched": sum(result.enriched for result in results.values()),
        "rows_written": sum(result.new_rows for result in results.values()),
        "requests": sum(result.requests for result in results.values()),
        "credits": float(sum((result.credits_consumed for result in results.values()), Decimal(0))),
        "errors_by_code": dict(sorted(errors.items())),
        "stopped": sorted(key for key, result in results.items() if result.stopped is not None),
    }


def manifest_figures(frame: pd.DataFrame) -> dict[str, Any]:
    """What the whole manifest holds: images, enriched, errors by code, credits (the bill it adds up to)."""
    codes = frame["error_code"].dropna().value_counts()
    return {
        "images": len(frame),
        "enriched": int(frame["error_code"].isna().sum()),
        "errors_by_code": {str(code): int(count) for code, count in sorted(codes.items())},
        "credits": float(frame["credits_consumed"].fillna(0).sum()),
    }
