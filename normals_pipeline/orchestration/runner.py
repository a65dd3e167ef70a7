"""Run the whole pipeline in-process through the Dagster definitions: the inventory, then every shard.

This is what `normals-pipeline run` and `demo` call, so a script run and a UI run execute the same
assets, resources and checks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dagster import AssetCheckSeverity, DagsterInstance, Definitions, ExecuteInProcessResult
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ..enrich import PlanReads, Progress
from ..inventory import partition_keys
from ._metadata import PLAN_READS, PROGRESS_LISTENER, SHARD_LISTENER, STOPPED_SHARDS, plain
from .naming import INVENTORY_JOB, SHARD_JOB, SURFACE_NORMALS, TRAINING_PAIRS

# Step failures are logged at ERROR with their whole stack trace; the caller prints one line instead and the
# trace stays in the run's event log. Nothing is logged at CRITICAL, so the quiet console prints nothing.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
VERBOSE_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


class RunFailed(Exception):
    """A step failed: the message is one line saying what happened and what to do.

    `started` is False when nothing was sent yet (the inventory could not be taken).
    """

    def __init__(self, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.started = started


class CheckFailed(RunFailed):
    """A shard materialized but its manifest failed an asset check: the message names the shard and the check."""


@dataclass
class TrainingSummary:
    pairs: int = 0
    left_out: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)

    def add(self, metadata: dict) -> None:
        self.pairs += int(metadata.get("pairs", 0))
        self.left_out.update(metadata.get("left_out_by_reason") or {})
        self.splits.update(metadata.get("splits") or {})


@dataclass
class RunSummary:
    images: int = 0
    enriched: int = 0
    processed: int = 0  # images this run wrote a row for
    credits_consumed: float = 0.0
    requests: int = 0
    remaining_credits: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    training: TrainingSummary | None = None  # None: the definitions have no training_pairs asset

    def add(self, metadata: dict) -> None:
        self.images += int(metadata.get("images", 0))
        self.enriched += int(metadata.get("enriched", 0))
        self.processed += int(metadata.get("processed_this_run", 0))
        self.credits_consumed += float(metadata.get("credits_consumed", 0.0))
        self.requests += int(metadata.get("requests", 0))
        self.errors.update(metadata.get("errors_by_code", {}))
        if metadata.get("remaining_credits") is not None:
            self.remaining_credits = float(metadata["remaining_credits"])


@dataclass
class _Relay:
    """Each run's progress added to the runs' before it (`shards_per_run`), for one view of the command."""

    listener: Callable[[Progress], None]
    earlier: Progress = field(default_factory=Progress)
    latest: Progress = field(default_factory=Progress)

    def __call__(self, progress: Progress) -> None:
        self.latest = progress
        self.listener(self.earlier + progress)

    def next_run(self) -> None:
        self.earlier, self.latest = self.earlier + self.latest, Progress()


def _failure_message(result: ExecuteInProcessResult) -> tuple[str, dict]:
    """The user-facing message of the first failed step, and its metadata if it gave any."""
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data is not None:
            return data.user_failure_data.description or data.user_failure_data.label, plain(
                data.user_failure_data.metadata
            )
        error = data.error.cause if data.error and data.error.cause else data.error
        if error is not None:  # "pkg.module.DatasetNotFound: dataset not found: ..." -> without the module path
            qualified, _, text = error.message.strip().splitlines()[0].partition(": ")
            return f"{qualified.rsplit('.', 1)[-1]}: {text}", {}
    return "the run failed; see the Dagster event log", {}


def _first_failure(evaluations: list) -> str:
    """E.g. "4 failures, first: path str_length(None, 1) on 'a.png'", from the evaluations' metadata."""
    metadata = [plain(evaluation.metadata) for evaluation in evaluations]
    parts = []
    if counts := [found["failures"] for found in metadata if "failures" in found]:
        parts.append(f"{sum(counts)} failure{'' if sum(counts) == 1 else 's'}")
    if first := metadata[0].get("first_failure"):
        parts.append(f"first: {first}")
    return ", ".join(parts)


def _failed_check(result: ExecuteInProcessResult, keys: list[str]) -> str | None:
    """The one-line message for the failed asset checks of a shard run, None when all passed.

    A check that fails does not fail the step, so the run looks successful unless its events are read. The
    shards' own evaluations carry the figures (a range's whole result does not; see `checks`). A warning
    (`normal_map_quality`: its maps are left out and counted) does not stop the run.
    """
    failed = [
        event.event_specific_data
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
        and not event.event_specific_data.passed
        and event.event_specific_data.severity != AssetCheckSeverity.WARN
    ]
    if not failed:
        return None
    own = [evaluation for evaluation in failed if evaluation.partition] or failed
    failing = ", ".join(evaluation.partition for evaluation in own if evaluation.partition) or ", ".join(keys)
    detail = _first_failure(own) or own[0].description or "no details"
    return f"the manifest of shard {failing} failed the {own[0].check_name} check ({detail}); see the Dagster event log"


def _materializations(result: ExecuteInProcessResult, asset: str = SURFACE_NORMALS) -> dict[str, dict]:
    """Each shard's metadata of `asset`, from its own materialization (a ranged run emits one per partition)."""
    found = {}
    for event in result.all_events:
        if not event.is_step_materialization:
            continue
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.path[-1] == asset and materialization.partition:
            found[materialization.partition] = plain(materialization.metadata)
    return found


def _ranges(keys: list[str], size: int | None) -> list[list[str]]:
    size = size or len(keys)
    return [keys[start : start + size] for start in range(0, len(keys), size)]


def _execute(job, keys: list[str], instance: DagsterInstance, logs: dict) -> ExecuteInProcessResult:
    """One run over `keys` (consecutive partitions), as a backfill with a multi-run policy launches it."""
    if len(keys) == 1:
        return job.execute_in_process(partition_key=keys[0], instance=instance, raise_on_error=False, run_config=logs)
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return job.execute_in_process(tags=tags, instance=instance, raise_on_error=False, run_config=logs)


def default_instance() -> DagsterInstance:
    """The user's instance when DAGSTER_HOME is set (runs show in the UI), else a throwaway one."""
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def run_pipeline(
    defs: Definitions,
    shards: int,
    instance: DagsterInstance,
    progress: Callable[[str, dict], None] = lambda key, metadata: None,
    *,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    warn: Callable[[str], None] = lambda message: None,
    verbose: bool = False,
    shards_per_run: int | None = None,
) -> RunSummary:
    """Materialize the inventory, then the shards: one run over all of them (one stream of work), or runs
    of `shards_per_run` in turn. Raise `RunFailed` at the first stop. `progress` hears of each shard as it
    finishes, `on_progress` where the whole command stands as images finish (runs after the first add up),
    `warn` each warning of the inventory step (entries skipped, files set aside, a plan that will not fit).

    A shard whose manifest fails its check stops the run too (`CheckFailed`): such a failure comes from
    the code or the data, not from one image, so the next shards would most likely fail it as well.
    `verbose` logs each step to the console at INFO, stack traces included; otherwise the console is silent.
    """
    with _plan_reads():  # the inventory's plan reads the pending files once for the shard runs
        logs = VERBOSE_LOGS if verbose else QUIET_LOGS
        inventory = defs.resolve_job_def(INVENTORY_JOB).execute_in_process(
            instance=instance, raise_on_error=False, run_config=logs
        )
        for message in [] if verbose else _warnings(instance, inventory.run_id):  # verbose: on the console already
            warn(message)
        if not inventory.success:
            raise RunFailed(_failure_message(inventory)[0], started=False)
        shard_job = defs.resolve_job_def(SHARD_JOB)
        summary = RunSummary(training=TrainingSummary() if _builds(shard_job, TRAINING_PAIRS) else None)
        reported: set[str] = set()
        relay = _Relay(on_progress)

        def report(key: str, metadata: dict) -> None:
            reported.add(key)
            summary.add(metadata)
            progress(key, metadata)

        for keys in _ranges(partition_keys(shards), shards_per_run):
            tokens = SHARD_LISTENER.set(report), PROGRESS_LISTENER.set(relay)  # as it goes, not at the run's end
            try:
                result = _execute(shard_job, keys, instance, logs)
            finally:
                SHARD_LISTENER.reset(tokens[0])
                PROGRESS_LISTENER.reset(tokens[1])
            relay.next_run()
            done = _materializations(result)
            if not result.success:
                message, metadata = _failure_message(result)
                done.update(metadata.get(STOPPED_SHARDS) or {})
            for key in keys:
                if key in done and key not in reported:
                    report(key, done[key])
            if not result.success:
                raise RunFailed(message)
            if (failed := _failed_check(result, keys)) is not None:
                raise CheckFailed(failed)
            if summary.training is not None:
                for metadata in _materializations(result, TRAINING_PAIRS).values():
                    summary.training.add(metadata)
        return summary


@contextmanager
def _plan_reads() -> Iterator[None]:
    """What the plan reads, kept for the shard runs of this call (see `PlanReads`), then let go."""
    token = PLAN_READS.set(PlanReads())
    try:
        yield
    finally:
        PLAN_READS.reset(token)


def _warnings(instance: DagsterInstance, run_id: str) -> list[str]:
    """What the run's steps logged at WARNING or above: the quiet console shows none of it."""
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if not entry.is_dagster_event and entry.level >= logging.WARNING
    ]


def _builds(job, asset: str) -> bool:
    """Whether the job materializes `asset` (under any key prefix)."""
    return any(key.path[-1] == asset for key in job.asset_layer.selected_asset_keys)
