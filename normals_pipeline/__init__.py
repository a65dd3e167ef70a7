"""Enrich image datasets with portrait surface normals from the Clipdrop API.

The core (this package's top level) has no Dagster import and works from a script:

    from normals_pipeline import ClipdropClient, CreditGuard, Enricher, open_storage, rate_guard_for

The Dagster layer lives in `normals_pipeline.orchestration`.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_names

if TYPE_CHECKING:
    from ._errors import (
        ApiDown,
        ApiTimeout,
        ApiUnreachable,
        ClipdropError,
        CreditLimitReached,
        ImageRejected,
        InvalidApiKey,
        InvalidResponse,
        MissingApiKey,
        NoAnswer,
        OutOfCredits,
        RateLimited,
        RunStopped,
        ServerError,
        TransientError,
    )
    from .client import DEFAULT_API_URL, ApiResult, ClipdropClient, RetryPolicy
    from .enrich import Enricher, Item, ShardResult, current_items
    from .guards import CreditGuard, RateGuard, rate_guard_for
    from .inventory import read_inventory, shard_of, take_inventory, write_inventory
    from .manifest import MANIFEST_SCHEMA, read_manifest, read_manifests, write_manifest
    from .prepare import PreparedImage, prepare
    from .storage import LocalStorage, S3Storage, Storage, open_storage

__all__ = [
    "DEFAULT_API_URL",
    "MANIFEST_SCHEMA",
    "ApiResult",
    "ApiTimeout",
    "ApiDown",
    "ApiUnreachable",
    "ClipdropClient",
    "ClipdropError",
    "CreditGuard",
    "CreditLimitReached",
    "Enricher",
    "ImageRejected",
    "InvalidApiKey",
    "InvalidResponse",
    "Item",
    "LocalStorage",
    "MissingApiKey",
    "NoAnswer",
    "OutOfCredits",
    "PreparedImage",
    "RateGuard",
    "RateLimited",
    "RetryPolicy",
    "RunStopped",
    "S3Storage",
    "ServerError",
    "ShardResult",
    "Storage",
    "TransientError",
    "current_items",
    "open_storage",
    "prepare",
    "rate_guard_for",
    "read_inventory",
    "read_manifest",
    "read_manifests",
    "shard_of",
    "take_inventory",
    "write_inventory",
    "write_manifest",
]

# Every name is loaded on first use: `normals-pipeline --help`, its argument errors and the emulator start without
# pandas, boto3 or httpx, and importing the core never imports Dagster (the Component). `dg` finds the Component
# through the `dagster_dg_cli.registry_modules` entry point (`normals_pipeline`), which lists `dir()` of this
# module: hence `__dir__`.
_MODULES = {
    "._errors": (
        "ApiDown",
        "ApiTimeout",
        "ApiUnreachable",
        "ClipdropError",
        "CreditLimitReached",
        "ImageRejected",
        "InvalidApiKey",
        "InvalidResponse",
        "MissingApiKey",
        "NoAnswer",
        "OutOfCredits",
        "RateLimited",
        "RunStopped",
        "ServerError",
        "TransientError",
    ),
    ".client": ("DEFAULT_API_URL", "ApiResult", "ClipdropClient", "RetryPolicy"),
    ".enrich": ("Enricher", "Item", "ShardResult", "current_items"),
    ".guards": ("CreditGuard", "RateGuard", "rate_guard_for"),
    ".inventory": ("read_inventory", "shard_of", "take_inventory", "write_inventory"),
    ".manifest": ("MANIFEST_SCHEMA", "read_manifest", "read_manifests", "write_manifest"),
    ".prepare": ("PreparedImage", "prepare"),
    ".storage": ("LocalStorage", "S3Storage", "Storage", "open_storage"),
    ".components": ("SurfaceNormalsComponent",),
}
__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())
