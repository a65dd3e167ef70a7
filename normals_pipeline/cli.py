"""`normals-pipeline`: emulator, run, demo.

Exit codes: 0 the run completed (per-image errors included), 1 the run stopped (key refused, credits
gone, API unreachable), 2 it could not start (bad arguments, key or dataset missing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .emulator import _cli as emulator_cli


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="folder or s3://bucket/prefix of images")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix for maps and manifest")
    parser.add_argument(
        "--api-url", default=os.environ.get("CLIPDROP_API_URL"), help="API base URL (default: the real API)"
    )
    parser.add_argument(
        "--rpm", type=int, default=int(os.environ.get("CLIPDROP_RPM", "60")), help="the key's requests per minute"
    )
    parser.add_argument("--shards", type=int, default=None, help="number of partitions (default: NORMALS_SHARDS or 16)")
    parser.add_argument("--concurrency", type=int, default=8, help="images in flight at once")
    parser.add_argument("--credit-floor", type=float, default=0.0, help="stop before the balance drops below this")
    parser.add_argument("--budget", type=float, default=None, help="most credits one shard run may spend")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per image for 429, 5xx and network errors")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normals-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    emulator_cli.add_arguments(commands.add_parser("emulator", help="serve the Clipdrop API emulator on loopback"))
    _add_run_arguments(commands.add_parser("run", help="enrich a dataset through the Dagster definitions"))
    demo = commands.add_parser("demo", help="synthetic portraits + emulator + a full run + a contact sheet")
    demo.add_argument("--workdir", type=Path, default=Path("demo-output"), help="where to put everything")
    demo.add_argument("--images", type=int, default=12, help="how many synthetic portraits")
    portraits = commands.add_parser("portraits", help="write synthetic portraits to try the pipeline on")
    portraits.add_argument("folder", type=Path)
    portraits.add_argument("--count", type=int, default=12)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"normals-pipeline: {message}", file=sys.stderr)
    return code


def _print_shard(key: str, metadata: dict) -> None:
    if not metadata.get("images"):
        return
    errors = metadata.get("errors_by_code") or {}
    print(
        f"  shard {key}: {metadata.get('images', 0)} images, {metadata.get('enriched', 0)} enriched, "
        f"{sum(errors.values())} errors, {metadata.get('credits_consumed', 0):g} credits",
        flush=True,
    )


def run_command(args: argparse.Namespace) -> int:
    """Validate what can be checked up front, then run through the Dagster definitions."""
    if not os.environ.get("CLIPDROP_API_KEY"):
        return _fail("CLIPDROP_API_KEY is not set: export your Clipdrop API key (or try `normals-pipeline demo`)", 2)
    from .orchestration.partitions import shard_count_from_env

    try:
        shards = args.shards if args.shards is not None else shard_count_from_env()
        if min(shards, args.rpm, args.concurrency, args.max_attempts) < 1:
            raise ValueError("--shards, --rpm, --concurrency and --max-attempts must be at least 1")
    except ValueError as error:
        return _fail(str(error), 2)
    return _run(args, shards)


def _run(args: argparse.Namespace, shards: int) -> int:
    from dagster import EnvVar

    from .client import DEFAULT_API_URL
    from .orchestration import ClipdropResource, build_definitions
    from .orchestration.runner import RunFailed, default_instance, run_pipeline

    clipdrop = ClipdropResource(
        api_key=EnvVar("CLIPDROP_API_KEY"),
        api_url=args.api_url or DEFAULT_API_URL,
        requests_per_minute=args.rpm,
        concurrency=args.concurrency,
        credit_floor=args.credit_floor,
        run_budget=args.budget,
        max_attempts=args.max_attempts,
        redis_url=args.redis_url,
        oversize=args.oversize,
    )
    defs = build_definitions(dataset_uri=args.dataset, output_uri=args.output, shards=shards, clipdrop=clipdrop)
    print(f"enriching {args.dataset} -> {args.output} ({shards} shards, {args.rpm} requests/min)", flush=True)
    started = time.monotonic()
    try:
        summary = run_pipeline(defs, shards, default_instance(), progress=_print_shard)
    except RunFailed as error:
        if not error.started:
            return _fail(f"cannot start: {error}", 2)
        return _fail(f"run stopped: {error} (finished images are kept; re-run to continue)", 1)
    errors = ", ".join(f"{code}: {n}" for code, n in sorted(summary.errors.items())) or "none"
    remaining = f", {summary.remaining_credits:g} remaining" if summary.remaining_credits is not None else ""
    print(
        f"done in {time.monotonic() - started:.1f} s: {summary.images} images, {summary.enriched} enriched, "
        f"errors: {errors}; {summary.requests} requests, {summary.credits_consumed:g} credits consumed{remaining}"
    )
    print(f"manifest: {args.output.rstrip('/')}/manifest/ (hive-partitioned Parquet)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        return emulator_cli.run(args)
    if args.command == "run":
        return run_command(args)
    if args.command == "portraits":
        from .synthetic import make_portraits

        print(f"{len(make_portraits(args.folder, args.count))} portraits in {args.folder.resolve()}")
        return 0
    from .demo import run_demo

    return run_demo(args.workdir, args.images)


if __name__ == "__main__":
    sys.exit(main())
