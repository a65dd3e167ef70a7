"""`ClipdropHook`: an Airflow connection made into the core's settings, client and guards.

The connection `clipdrop_default` holds the key as its password, the API URL as its host and the key's rate in its
extra (`{"requests_per_minute": 300}`; also `concurrency`, `credit_floor`, `run_budget`, `timeout_seconds`,
`max_attempts`, `oversize`, `redis_url`). Without such a connection the hook reads the same variables as
`definitions.py`: `CLIPDROP_API_KEY`, `CLIPDROP_API_URL`, `CLIPDROP_RPM`, `NORMALS_REDIS_URL`. The guards live in
the key's shared state (`NORMALS_STATE_DIR` or Redis), so Airflow tasks and Dagster runs on one key keep its rate,
credits and claims together.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from ..client import DEFAULT_API_URL, ClipdropClient
from ..settings import ClipdropSettings

EXTRA_FIELDS = (
    "requests_per_minute",
    "concurrency",
    "credit_floor",
    "run_budget",
    "timeout_seconds",
    "max_attempts",
    "oversize",
    "redis_url",
)


def api_url_of(host: str | None, schema: str | None, port: int | None) -> str | None:
    """The connection's host as a base URL: kept whole when it has a scheme, else https (or the schema field)."""
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    return f"{schema or 'https'}://{host}{f':{port}' if port else ''}"


class ClipdropHook(BaseHook):
    """The key's settings from an Airflow connection (or the environment), and a guarded client for one task."""

    conn_name_attr = "clipdrop_conn_id"
    default_conn_name = "clipdrop_default"
    conn_type = "clipdrop"
    hook_name = "Clipdrop"

    def __init__(self, clipdrop_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.clipdrop_conn_id = clipdrop_conn_id

    def settings(self) -> ClipdropSettings:
        """From the connection if it is defined, else from the environment; a missing key fails the task."""
        try:
            conn = self.get_connection(self.clipdrop_conn_id)
        except AirflowNotFoundException:
            key, url = os.environ.get("CLIPDROP_API_KEY"), os.environ.get("CLIPDROP_API_URL")
            extra = {"requests_per_minute": os.environ.get("CLIPDROP_RPM", "60")}
        else:
            key, url, extra = conn.password, api_url_of(conn.host, conn.schema, conn.port), conn.extra_dejson
        if not key:
            raise AirflowFailException(
                f"no Clipdrop API key: give the connection {self.clipdrop_conn_id!r} a password, or set "
                "CLIPDROP_API_KEY"
            )
        return settings_from(key, url or DEFAULT_API_URL, extra)

    @contextmanager
    def get_client(self) -> Iterator[ClipdropClient]:
        with self.settings().open_client() as client:
            yield client

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["login", "port"],
            "relabeling": {"password": "API key", "host": "API URL"},
            "placeholders": {"host": DEFAULT_API_URL, "extra": '{"requests_per_minute": 60}'},
        }


def settings_from(key: str, url: str, extra: dict[str, Any]) -> ClipdropSettings:
    """The core's settings from a connection's extra (or the environment's), refusing what it does not know."""
    unknown = sorted(set(extra) - {*EXTRA_FIELDS, "rpm"})
    if unknown:
        raise AirflowFailException(f"unknown Clipdrop connection extra {unknown}: known are {list(EXTRA_FIELDS)}")
    redis_url = extra.get("redis_url") or os.environ.get("NORMALS_REDIS_URL") or None
    try:
        return ClipdropSettings(
            api_key=key,
            api_url=url,
            requests_per_minute=int(extra.get("requests_per_minute", extra.get("rpm", 60))),
            concurrency=int(extra["concurrency"]) if extra.get("concurrency") else None,
            credit_floor=Decimal(str(extra.get("credit_floor", 0))),
            run_budget=Decimal(str(extra["run_budget"])) if extra.get("run_budget") is not None else None,
            timeout_s=float(extra.get("timeout_seconds", 60.0)),
            max_attempts=int(extra.get("max_attempts", 6)),
            oversize=extra.get("oversize", "downscale"),
            redis_url=redis_url,
        )
    except (ValueError, ArithmeticError) as error:
        raise AirflowFailException(f"the Clipdrop connection's extra is not valid: {error}") from None
