"""normals-pipeline: enrich images with Clipdrop surface normals (plan, run, export, demo, portraits, reshard, emulator)

Exit codes: 0 the run completed (per-image errors included), 1 the run stopped (key refused, credits
gone, API unreachable, a manifest failed its check, SIGTERM or Ctrl-C), 2 it could not start (bad option,
key or dataset missing, output inside the dataset or not writable). `plan`: 0 the run would fit, 1 it would
not (budget, balance less the floor), 2 it cannot start. `export`: 0 written (or nothing changed), 2 it cannot
start (no training pairs under the output). Every error is one `normals-pipeline: ` line on stderr;
`--verbose` adds Dagster's log with its stack traces.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .emulator import _cli as emulator_cli

if TYPE_CHECKING:
    from .enrich import Progress
    from .live import PlainView
    from .orchestration.runner import RunSummary, TrainingSummary
    from .ownership import Lease
    from .plan import Figures, Plan
    from .storage import Storage

MAX_SHARDS = 10_000
_STOPS = {signal.SIGTERM, signal.SIGINT}  # the signals that stop a run, keeping what is finished


class CannotStart(Exception):
    """A bad option, a location or a shared state the run cannot use: one line and exit 2, before anything
    starts (so before Dagster, whose failures come with stack traces)."""


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage and the error on two lines and exits; the CLI's errors are one line.

    Subcommand parsers are made with the parent's class, so this covers them too.
    """

    def error(self, message: str) -> NoReturn:
        raise CannotStart(f"{' '.join(message.split())} (see `{self.prog} --help`)")


def _count(most: int | None = None) -> Callable[[str], int]:
    """A whole number from 1 (to `most`): 0 requests per minute, shards or attempts would never send."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < 1 or (most is not None and value > most):
            bounds = f"between 1 and {most}" if most is not None else "at least 1"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _credits(text: str) -> float:
    """A finite number >= 0: every comparison with NaN is false, so a NaN floor or budget would never stop."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of credits, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of credits, 0 or more, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A number of seconds above 0 and at most `MAX_TIMEOUT_S`: a deadline of 0 (or NaN) would end every request
    before its answer, and one longer than a turn's lifetime on the key's rate would let the turn lapse while
    its request is still out."""
    from .guards import MAX_TIMEOUT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        bound = f"at most {MAX_TIMEOUT_S:g}"
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, {bound}, got {text!r}")
    return value


def _api_url(text: str) -> str:
    """The resource's own rule, so the CLI and a YAML or UI configuration accept the same URLs."""
    from .client import check_api_url

    try:
        return check_api_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _splits(text: str) -> dict[str, float]:
    """`TRAIN,VALIDATION,TEST` fractions, e.g. 0.9,0.05,0.05: the training module's own rule."""
    from .training import SPLITS, check_splits

    try:
        values = [float(part) for part in text.split(",")]
        if len(values) != len(SPLITS):
            raise ValueError(f"expected {len(SPLITS)} fractions (train,validation,test), got {text!r}")
        return check_splits(dict(zip(SPLITS, values)))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """What `run` and `plan` share, with the same meaning and parsers."""
    parser.add_argument("--dataset", required=True, help="folder or s3://bucket/prefix of images")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix for maps and manifest")
    parser.add_argument(  # a string default goes through `type` too, so a bad CLIPDROP_RPM is refused alike
        "--rpm",
        type=_count(),
        default=os.environ.get("CLIPDROP_RPM", "60"),
        help="the key's requests per minute (default: CLIPDROP_RPM or 60)",
    )
    parser.add_argument(
        "--shards", type=_count(MAX_SHARDS), default=None, help="number of partitions (default: NORMALS_SHARDS or 16)"
    )
    parser.add_argument(
        "--concurrency",
        type=_count(),
        default=None,
        help="images in flight at once (default: follows the key's rate and the observed latency, up to 64)",
    )
    parser.add_argument(
        "--credit-floor", type=_credits, default=0.0, help="stop before the balance drops below this (default: 0)"
    )
    parser.add_argument(
        "--budget", type=_credits, default=None, help="most credits one Dagster run may spend (default: no limit)"
    )
    parser.add_argument(
        "--oversize",
        choices=["downscale", "refuse"],
        default="downscale",
        help="images over 25 megapixels: downscale to fit (default) or refuse",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("NORMALS_REDIS_URL"),
        help="share the key's rate and credits across hosts (default: across this host's processes, via SQLite)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_plan_arguments(parser)
    parser.add_argument(
        "--api-url",
        type=_api_url,
        default=os.environ.get("CLIPDROP_API_URL"),
        help="API base URL, http:// or https:// (default: CLIPDROP_API_URL or the real API)",
    )
    parser.add_argument(
        "--shards-per-run",
        type=_count(MAX_SHARDS),
        default=None,
        help="shards one Dagster run covers, as one stream of work (default: all of them in one run)",
    )
    parser.add_argument(
        "--max-attempts", type=_count(), default=6, help="tries per image for 429, 5xx and network errors (default: 6)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="most time one request may take, from connecting to the answer's last byte; one still unanswered "
        "then is recorded as `timeout` and sent again by the next run (default: 60)",
    )
    parser.add_argument(
        "--no-training-pairs",
        dest="training_pairs",
        action="store_false",
        help="do not build the training pairs (image as sent + normal map) under <output>/training/",
    )
    parser.add_argument(
        "--splits",
        type=_splits,
        default=None,  # DEFAULT_SPLITS: a string default would be parsed, importing `training`, before any check
        help="train,validation,test fractions of the training pairs, by content (default: 0.9,0.05,0.05)",
    )
    parser.add_argument(
        "--webdataset", action="store_true", help="also write the training pairs as WebDataset tar shards"
    )
    parser.add_argument(
        "--refresh-balance",
        action="store_true",
        help="forget the key's stored balance and believe the API's next answer (after a top-up)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Dagster's log, stack traces and Python warnings on the console"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normals-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    emulator_cli.add_arguments(commands.add_parser("emulator", help="serve the Clipdrop API emulator on loopback"))
    _add_run_arguments(commands.add_parser("run", help="enrich a dataset through the Dagster definitions"))
    plan = commands.add_parser("plan", help="what the next run would send and charge: no request, nothing written")
    _add_plan_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    demo = commands.add_parser("demo", help="synthetic portraits + emulator + the plan + two runs + a contact sheet")
    demo.add_argument(
        "--workdir", type=Path, default=Path("demo-output"), help="where to put everything (default: demo-output)"
    )
    demo.add_argument("--images", type=_count(), default=12, help="how many synthetic portraits (default: 12)")
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="delete an earlier demo in --workdir and start over (default: keep it; its images charge nothing again)",
    )
    portraits = commands.add_parser("portraits", help="write synthetic portraits to try the pipeline on")
    portraits.add_argument("folder", type=Path, help="where to write them (created if missing)")
    portraits.add_argument("--count", type=_count(), default=12, help="how many portraits (default: 12)")
    portraits.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the same seed writes the same bytes; another seed, other portraits (default: 0)",
    )
    export = commands.add_parser(
        "export", help="write the training pairs in a trainer's folder layout: no request, from the pairs alone"
    )
    export.add_argument("--output", required=True, help="folder or s3://bucket/prefix enriched before")
    export.add_argument(
        "--layout",
        required=True,
        choices=["sapiens", "marigold", "dsine"],
        help="written under <output>/training/<layout>/",
    )
    export.add_argument(
        "--convention",
        choices=["opengl", "opencv", "omnidata", "dsine"],
        default=None,
        help="axes of the normals written (default: the trainer's: sapiens opencv, marigold opengl, dsine dsine)",
    )
    reshard = commands.add_parser("reshard", help="move an output's manifests to another shard count (no run going)")
    reshard.add_argument("--output", required=True, help="folder or s3://bucket/prefix enriched before")
    reshard.add_argument("--shards", type=_count(MAX_SHARDS), required=True, help="the new number of partitions")
    return parser


def export_command(output_uri: str, layout: str, convention: str | None) -> int:
    """Every partition's pairs in `layout`; only what changed since the last export is written."""
    from .export import export_layout, layout_dir, pair_partitions
    from .storage import open_storage
    from .training import PARQUET_DIR

    try:
        output = open_storage(output_uri)
    except ValueError as error:
        raise CannotStart(str(error)) from None
    if not pair_partitions(output):
        where = _location(output_uri, PARQUET_DIR + "/")
        raise CannotStart(f"no training pairs under {where}: `normals-pipeline run` builds them")
    result = export_layout(output, layout, convention)
    change = f"{result.written} files written, {result.deleted} deleted" if not result.reused else "unchanged"
    where = _location(output_uri, layout_dir(layout) + "/")
    print(f"{layout} ({result.convention}): {result.samples} samples, {change}; {where}")
    return 0


def reshard_command(output_uri: str, shards: int) -> int:
    """Rewrite the manifests for `shards` partitions, so a run with that count lists each image once."""
    from .inventory import partition_key, shard_of
    from .manifest import reshard
    from .storage import open_storage

    rows = reshard(open_storage(output_uri), shards, lambda path: partition_key(shard_of(path, shards), shards))
    print(f"{rows} manifest rows now in {shards} shards under {output_uri.rstrip('/')}/manifest/")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"normals-pipeline: {message}", file=sys.stderr)
    return code


def _print_shard(view: PlainView, metadata: dict) -> None:
    """A shard's warnings (e.g. a quarantined manifest), one a line: the quiet console shows no Dagster log,
    so metadata is how they reach the user. Its figures go into the live view and the summary instead."""
    from .live import shell_paths

    found = metadata.get("warnings") or []
    for warning in [found] if isinstance(found, str) else found:
        view.print(f"  warning: {shell_paths(warning)}")


def _comparable(storage: Storage) -> str:
    """The storage's URI, with a local folder's symlinks resolved so two spellings of a folder compare equal."""
    from .storage import LocalStorage

    return Path(os.path.realpath(storage.root)).as_uri() if isinstance(storage, LocalStorage) else storage.uri


def _check_writable(folder: Path, uri: str) -> None:
    """Create the folder and a file in it now: a run that cannot write would fail only after the inventory."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CannotStart(f"the output {uri} is not a writable folder ({error.strerror or error})") from None


def check_locations(dataset_uri: str, output_uri: str, writable: bool = True) -> None:
    """Refuse, with one line, what would make the inventory step fail: a missing local dataset, an output
    inside the dataset (the asset's own rule, on resolved paths) and, if `writable`, an output that cannot be
    written (the probe writes: the plan skips it). S3 locations are left to the run: checking them needs
    credentials and a round trip."""
    from .storage import LocalStorage, open_storage

    unused_s3_client = object()  # only the URI of an S3 location is read here
    try:
        dataset = open_storage(dataset_uri, s3_client=unused_s3_client)
        output = open_storage(output_uri, s3_client=unused_s3_client)
    except ValueError as error:
        raise CannotStart(str(error)) from None
    if isinstance(dataset, LocalStorage) and not dataset.root.is_dir():
        raise CannotStart(f"dataset not found: {dataset_uri} is not a folder")
    if (_comparable(output) + "/").startswith(_comparable(dataset).rstrip("/") + "/"):
        raise CannotStart(f"the output {output_uri} lies inside the dataset {dataset_uri}: choose an output outside it")
    if writable and isinstance(output, LocalStorage):
        _check_writable(output.root, output_uri)


def hold_output(output_uri: str, redis_url: str | None) -> Lease | None:
    """This command's lease on the output (see `ownership`), held through the run so a run of another state
    is refused here, with one line, even when both start at once; the run's own lease joins it. An output or
    state that cannot be read now is left to the run (None), which says why."""
    from .guards import claim_store
    from .live import shell_paths
    from .ownership import OutputInUse, take
    from .storage import open_storage

    def warn(line: str) -> None:
        print(f"warning: {shell_paths(line)}", flush=True)

    try:
        return take(open_storage(output_uri), claim_store(redis_url), warn)
    except OutputInUse as error:
        raise CannotStart(shell_paths(str(error))) from None
    except Exception:
        return None


def run_command(args: argparse.Namespace) -> int:
    """Check what can be checked up front (exit 2 with one line), then run through the Dagster definitions."""
    if not os.environ.get("CLIPDROP_API_KEY"):
        return _fail("CLIPDROP_API_KEY is not set: export your Clipdrop API key (or try `normals-pipeline demo`)", 2)
    from .orchestration.partitions import shard_count_from_env

    try:
        shards = args.shards if args.shards is not None else shard_count_from_env()
    except ValueError as error:
        return _fail(str(error), 2)
    check_locations(args.dataset, args.output)
    for warning in _open_state(os.environ["CLIPDROP_API_KEY"], args.redis_url):
        print(f"warning: {warning}", flush=True)
    if args.refresh_balance:
        _refresh_balance(os.environ["CLIPDROP_API_KEY"], args.redis_url)
    lease = hold_output(args.output, args.redis_url)
    try:
        with _console(args.verbose):
            return _run(args, shards)
    finally:
        if lease is not None:
            lease.close()


def plan_command(args: argparse.Namespace) -> int:
    """What the next `run` with these options would send and charge, from the output's own record, with no
    request and nothing written: exit 0 when it fits, 1 when its credits are over `--budget` or the key's last
    known balance less `--credit-floor`, 2 when it cannot start. A missing key only leaves the balance unknown."""
    from .inventory import shard_count_from_env

    try:
        shards = args.shards if args.shards is not None else shard_count_from_env()
    except ValueError as error:
        return _fail(str(error), 2)
    check_locations(args.dataset, args.output, writable=False)
    set_aside = _open_state(os.environ.get("CLIPDROP_API_KEY"), args.redis_url)
    plan = _plan(args, shards)
    plan = replace(plan, warnings=(*set_aside, *plan.warnings))
    budget = Decimal(str(args.budget)) if args.budget is not None else None
    reason = plan.shortfall(Decimal(str(args.credit_floor)), budget)
    if args.json:
        print(json.dumps({**plan.as_dict(), "shortfall": reason}))
    else:
        _print_plan(plan, args, shards)
    return _fail(reason, 1) if reason else 0


def _plan(args: argparse.Namespace, shards: int) -> Plan:
    from .guards import claim_store
    from .inventory import inventory_shards
    from .manifest import LayoutMismatch, check_layout
    from .plan import make_plan
    from .storage import DatasetNotFound, open_storage

    dataset, output = open_storage(args.dataset), open_storage(args.output)
    try:
        check_layout(output, shards, lambda: inventory_shards(output), record=False)
        return make_plan(
            dataset,
            output,
            shards,
            rpm=args.rpm,
            concurrency=args.concurrency,
            oversize=args.oversize,
            claims=claim_store(args.redis_url),
            balance=_known_balance(os.environ.get("CLIPDROP_API_KEY"), args.redis_url),
        )
    except (DatasetNotFound, LayoutMismatch) as error:
        from .live import shell_paths

        raise CannotStart(shell_paths(str(error))) from None


def _known_balance(api_key: str | None, redis_url: str | None) -> tuple[Decimal, float] | None:
    """The key's last known balance and its age, from its shared state (no request); None without a key."""
    from .guards import key_state

    if not api_key:
        return None
    try:
        return key_state(api_key, redis_url).known_balance()
    except Exception as error:  # Redis or the state file unusable: the run could not share the key's state either
        raise CannotStart(f"cannot read the key's stored balance: {type(error).__name__}: {error}") from None


def _print_plan(plan: Plan, args: argparse.Namespace, shards: int) -> None:
    """A table of every shard and their total (plain numbers), its warnings, the balance and the
    time; the paths quoted so they paste into a shell."""
    from .plan import TABLE_COLUMNS

    def cells(figures: Figures) -> list[str]:
        return [str(plan.figures(figures)[column]) for column in TABLE_COLUMNS]

    print(f"plan for {shlex.quote(args.dataset)} -> {shlex.quote(args.output)} ({shards} shards); nothing sent")
    rows = [[f"shard {key}", *cells(figures)] for key, figures in plan.shards.items()]
    for line in _table([["", *TABLE_COLUMNS], *rows, ["total", *cells(plan.total)]]):
        print(f"  {line}")
    for warning in plan.warnings:
        print(f"  warning: {warning}")
    print(f"balance: {_balance_text(plan.balance)}")
    if not plan.total.to_send:
        print("time: nothing to send")
        return
    pace = f"{plan.images_per_second * 60:.0f} images/min ({args.rpm} requests/min)"
    print(f"time: {_duration(plan.eta_seconds(plan.total))} at {pace}")


def _table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned lines: the first column to the left, numbers to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]) for row in rows
    ]


def _balance_text(balance: tuple[Decimal, float] | None) -> str:
    from .plan import json_number

    if balance is not None:
        return f"{json_number(balance[0])} credits, reported {balance[1]:.0f} s ago"
    return (
        "unknown (none reported yet)" if os.environ.get("CLIPDROP_API_KEY") else "unknown (CLIPDROP_API_KEY is not set)"
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"about {hours} h {minutes} min"
    return f"about {minutes} min {rest} s" if minutes else f"about {rest} s"


def _open_state(api_key: str | None, redis_url: str | None) -> list[str]:
    """Open this host's state files (the key's, the claims) before the run, so that one set aside because it
    could not be read is said first, as a path to paste: one line each."""
    from ._state import take_set_aside_warnings
    from .guards import claim_store, key_state
    from .live import shell_paths

    if redis_url is None:
        try:
            claim_store()
            if api_key:
                key_state(api_key)
        except Exception as error:  # a state folder that cannot be written: the run could not share the key either
            raise CannotStart(f"cannot open this host's state files: {type(error).__name__}: {error}") from None
    return [shell_paths(warning) for warning in take_set_aside_warnings()]


def _refresh_balance(api_key: str, redis_url: str | None) -> None:
    """After a top-up: forget the key's stored balance, which only goes down, so the next answer's is believed."""
    from .guards import forget_balance

    try:
        forget_balance(api_key, redis_url)
    except Exception as error:  # Redis or the state file unusable: the run could not share the key's state either
        raise CannotStart(f"cannot refresh the stored balance: {type(error).__name__}: {error}") from None


@contextmanager
def _console(verbose: bool) -> Iterator[None]:
    """Without --verbose, hide Python warnings (Dagster's beta and deprecation notices) and stamina's log
    line per retry: they are for developers, the retries are counted in the shards' metadata, and the
    user's warnings come as `warning:` lines from that metadata."""
    import stamina.instrumentation

    hooks = stamina.instrumentation.get_on_retry_hooks()
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
            stamina.instrumentation.set_on_retry_hooks([])
        try:
            yield
        finally:
            stamina.instrumentation.set_on_retry_hooks(hooks)


def _run(args: argparse.Namespace, shards: int) -> int:
    from dagster import EnvVar

    from .client import DEFAULT_API_URL
    from .live import open_view, shell_paths
    from .orchestration import ClipdropResource, build_definitions
    from .orchestration.runner import RunFailed, default_instance, run_pipeline
    from .training import DEFAULT_SPLITS

    clipdrop = ClipdropResource(
        api_key=EnvVar("CLIPDROP_API_KEY"),
        api_url=args.api_url or DEFAULT_API_URL,
        requests_per_minute=args.rpm,
        concurrency=args.concurrency,
        credit_floor=args.credit_floor,
        run_budget=args.budget,
        max_attempts=args.max_attempts,
        timeout_seconds=args.timeout,
        redis_url=args.redis_url,
        oversize=args.oversize,
    )
    defs = build_definitions(
        dataset_uri=args.dataset,
        output_uri=args.output,
        shards=shards,
        clipdrop=clipdrop,
        training_pairs=args.training_pairs,
        training_splits=args.splits or DEFAULT_SPLITS,
        webdataset=args.webdataset,
    )
    print(f"enriching {args.dataset} -> {args.output} ({shards} shards, {args.rpm} requests/min)", flush=True)
    view = open_view(args.rpm, verbose=args.verbose)
    started = time.monotonic()
    with _stop_signals() as stopped_by, view:
        try:
            instance = default_instance()
            _loaded()
            summary = run_pipeline(
                defs,
                shards,
                instance,
                progress=lambda key, metadata: _print_shard(view, metadata),
                on_progress=view.update,
                warn=lambda message: view.print(f"warning: {shell_paths(message)}"),
                verbose=args.verbose,
                shards_per_run=args.shards_per_run,
            )
        except (RunFailed, KeyboardInterrupt) as error:
            failure, by = error, stopped_by() or ("SIGINT" if isinstance(error, KeyboardInterrupt) else None)
        else:
            failure, by = None, None
    elapsed = time.monotonic() - started
    if failure is None:
        _print_done(summary, elapsed, args.output)
        return 0
    if isinstance(failure, RunFailed) and not failure.started and by is None:
        return _fail(f"cannot start: {shell_paths(str(failure))}", 2)
    _print_stopped(view.last, elapsed)
    return _fail(shell_paths(_stop_reason(failure, by)), 1)


def _stop_reason(error: BaseException, signal_name: str | None) -> str:
    """The one-line reason a started run stopped."""
    from ._errors import stopped_line
    from .orchestration.runner import CheckFailed

    if signal_name is not None:
        return f"stopped by {signal_name}; finished images kept (re-run to continue)"
    if isinstance(error, CheckFailed):
        return str(error)
    return stopped_line(str(error))


def _print_stopped(progress: Progress | None, elapsed: float) -> None:
    """What the stopped run did, from its last progress: no shard looks finished that is not."""
    if progress is None:
        print(f"stopped after {elapsed:.1f} s, before any image was processed", flush=True)
        return
    figures = _figures(progress.errors, progress.requests, progress.credits, progress.remaining)
    print(
        f"stopped after {elapsed:.1f} s: {progress.done} of {progress.total} images processed "
        f"({progress.total - progress.done} unfinished), {progress.enriched} enriched, {figures}",
        flush=True,
    )


def _print_done(summary: RunSummary, elapsed: float, output: str) -> None:
    from .live import counted, plain_number

    figures = _figures(summary.errors, summary.requests, summary.credits_consumed, summary.remaining_credits)
    if summary.processed == 0:  # a re-run with nothing new: say so rather than list what earlier runs did
        errors = counted(sum(summary.errors.values()), "error")
        left = f"{plain_number(summary.remaining_credits)} credits remaining" if summary.remaining_credits else ""
        print(
            f"nothing to send: {counted(summary.images, 'image')} done already ({summary.enriched} enriched, "
            f"{errors}); 0 requests{', ' + left if left else ''}"
        )
    else:
        print(f"done in {elapsed:.1f} s: {summary.images} images, {summary.enriched} enriched, {figures}")
    print(f"manifest: {_location(output, 'manifest/')} (hive-partitioned Parquet)")
    if summary.training is not None:
        _print_training(summary.training, output)


def _figures(
    errors: Mapping[str, int], requests: int, credits: float | Decimal, remaining: float | Decimal | None
) -> str:
    """The end of both summaries: errors by code, requests, credits as plain numbers."""
    from .live import plain_number

    by_code = ", ".join(f"{code}: {n}" for code, n in sorted(errors.items())) or "none"
    left = f", {plain_number(remaining)} remaining" if remaining is not None else ""
    return f"errors: {by_code}; {requests} requests, {plain_number(credits)} credits consumed{left}"


def _location(output: str, below: str) -> str:
    """`below` under the output as the user can paste it: an S3 URI, or a shell-quoted local path."""
    joined = f"{output.rstrip('/')}/{below}"
    return joined if "://" in output else shlex.quote(joined)


@contextmanager
def _stop_signals() -> Iterator[Callable[[], str | None]]:
    """Which signal stopped the run, if one did. Dagster turns SIGTERM and SIGINT alike into an interrupted
    step, so the signal is read from the wakeup fd, where Python writes the number of every signal it
    handles; outside Dagster's steps SIGTERM stops the run as Ctrl-C does (KeyboardInterrupt)."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    seen: list[str] = []

    def stopped_by() -> str | None:
        try:
            seen.extend(signal.Signals(number).name for number in os.read(read, 256) if number in _STOPS)
        except BlockingIOError:  # nothing received
            pass
        return seen[0] if seen else None

    try:
        yield stopped_by
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)


def _print_training(training: TrainingSummary, output: str) -> None:
    from .training import PARQUET_DIR, SPLITS

    splits = ", ".join(f"{split} {training.splits[split]}" for split in SPLITS)
    left_out = ", ".join(f"{reason}: {n}" for reason, n in sorted(training.left_out.items())) or "none"
    print(f"training pairs: {training.pairs} ({splits}), left out: {left_out}; {_location(output, PARQUET_DIR + '/')}")


_starting = threading.Event()  # set by `console` while the command's modules load, the collector off


def console() -> NoReturn:
    """The `normals-pipeline` command: `main`, then the process ends as soon as its output is out. Until the
    command's modules are loaded (`_loaded`), nothing is collected: importing Dagster, pandas and pyarrow makes
    objects that live as long as the process, and the collector's full passes over them cost ~0.3 s."""
    _starting.set()
    gc.disable()
    end(main())


def _loaded() -> None:
    """What exists now lives as long as the process: the collector leaves it out of every later pass
    (`gc.freeze`; a full pass over a run's heap went from ~0.15 s to ~0.02 s) and starts collecting again."""
    if _starting.is_set():
        _starting.clear()
        gc.freeze()
        gc.enable()


def end(code: int) -> NoReturn:
    """Exit with `code` once the exit handlers have run and stdout and stderr are flushed, without the
    interpreter's teardown, which frees every object of Dagster, pandas and pyarrow one by one: ~1 s after a
    run, on a command that did its work. With another thread still going (none should be), the usual exit,
    which waits for it."""
    main_thread = threading.main_thread()
    if any(thread is not main_thread and not thread.daemon for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging's flush, temporary folders (Dagster's ephemeral instance), ...
    with suppress(OSError, ValueError):  # a reader gone (a closed pipe): nothing more to say to it
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: see the module docstring. `--help` still exits 0 through argparse."""
    try:
        return _dispatch(build_parser().parse_args(argv))
    except CannotStart as error:
        return _fail(str(error), 2)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command != "run":
        _loaded()
    if args.command == "emulator":
        return emulator_cli.run(args)
    if args.command == "run":
        return run_command(args)
    if args.command == "plan":
        return plan_command(args)
    if args.command == "export":
        return export_command(args.output, args.layout, args.convention)
    if args.command == "reshard":
        return reshard_command(args.output, args.shards)
    if args.command == "portraits":
        from .synthetic import make_portraits

        made = make_portraits(args.folder, args.count, seed=args.seed)
        print(f"{len(made)} portraits (seed {args.seed}) in {args.folder.resolve()}")
        return 0
    from .demo import run_demo

    return run_demo(args.workdir, args.images, fresh=args.fresh)


if __name__ == "__main__":
    console()
