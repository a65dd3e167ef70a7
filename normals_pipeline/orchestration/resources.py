"""Resources: thin `ConfigurableResource`s over the core's client and storage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Literal

import pyarrow as pa
from dagster import ConfigurableResource, EnvVar
from pydantic import Field, field_validator

from .._state import ClaimStore
from ..client import DEFAULT_API_URL, ClipdropClient, check_api_url
from ..enrich import PlanReads
from ..guards import MAX_TIMEOUT_S
from ..plan import Plan
from ..settings import ClipdropSettings
from ..storage import Storage, open_storage, s3_config


def _resolved(value: str | None) -> str | None:
    """A field's value, an `EnvVar` read from the environment (None when unset)."""
    return value.get_value() if isinstance(value, EnvVar) else value


class ClipdropResource(ConfigurableResource):
    """The Clipdrop API behind its rate and credit guards. Pass the key as `EnvVar("CLIPDROP_API_KEY")`."""

    api_key: str = Field(description="Clipdrop API key; give it as an EnvVar so it is never stored in config.")
    api_url: str = Field(default=DEFAULT_API_URL, description="Base URL of the API (or of the emulator).")
    requests_per_minute: int = Field(default=60, ge=1, description="The key's rate limit.")
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Images in flight at once per run. Unset: follows the key's rate × the observed latency "
        "(Little's law) with 1.5× headroom, 2 to 64, and at most 256 MiB of images held.",
    )
    credit_floor: float = Field(default=0.0, ge=0, description="Stop sending before the balance would drop below this.")
    run_budget: float | None = Field(default=None, ge=0, description="Most credits one run may spend; none: no limit.")
    timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=MAX_TIMEOUT_S,  # a request's turn on the key's rate must outlive it
        allow_inf_nan=False,
        description="Most seconds one request may take, from connecting to the answer's last byte (one deadline, "
        "not per read); an answer not whole by then is recorded as `timeout` and sent again by the next run.",
    )
    max_attempts: int = Field(
        default=6, ge=1, description="Tries per image for 429, 5xx, timeouts and connection errors."
    )
    oversize: Literal["downscale", "refuse"] = Field(
        default="downscale", description="Images over 25 megapixels: downscale them to fit, or refuse them."
    )
    redis_url: str | None = Field(
        default=None,
        description="Share the key's rate and credits across hosts through Redis (redis://host:6379/0); "
        "without it, every process on this host shares them through a SQLite file.",
    )

    @field_validator("api_url", mode="before")
    @classmethod
    def _http_api_url(cls, value: Any) -> Any:
        """Refuse a non-http(s) URL when the resource is configured (code, YAML, the UI), not at the first request.
        An EnvVar is checked once Dagster resolves it at launch; a non-string is left to the `str` type."""
        return check_api_url(value) if isinstance(value, str) and not isinstance(value, EnvVar) else value

    def settings(self) -> ClipdropSettings:
        """The core's settings of this key. Called on the definitions' resource too (the inventory's plan), whose
        fields may still be `EnvVar`s: read here; the key empty (balance unknown) when unset."""
        return ClipdropSettings(
            api_key=_resolved(self.api_key) or "",
            api_url=_resolved(self.api_url) or DEFAULT_API_URL,
            requests_per_minute=self.requests_per_minute,
            concurrency=self.concurrency,
            credit_floor=Decimal(str(self.credit_floor)),
            run_budget=Decimal(str(self.run_budget)) if self.run_budget is not None else None,
            timeout_s=self.timeout_seconds,
            max_attempts=self.max_attempts,
            oversize=self.oversize,
            redis_url=_resolved(self.redis_url) or None,
        )

    @contextmanager
    def get_client(self) -> Iterator[ClipdropClient]:
        """A client for one run: the rate guard is shared by the process, the credit guard is the run's."""
        with self.settings().open_client() as client:
            yield client

    def plan(
        self, dataset: Storage, output: Storage, inventory: pa.Table, shards: int, keep: PlanReads | None = None
    ) -> Plan:
        """What the next run with these settings would send and charge, from `inventory`: no request, no write.
        `keep`: where to leave what was read for that run, when it follows in this process."""
        return self.settings().plan(dataset, output, inventory, shards, keep)

    def shortfall(self, plan: Plan) -> str | None:
        """Why a run would not fit the key's balance less `credit_floor`, or `run_budget`; None if it would."""
        return self.settings().shortfall(plan)

    def claim_store(self) -> ClaimStore:
        """Claims where every run can see them: the same place as the key's guards (see `ClipdropSettings`)."""
        return self.settings().claim_store()


class S3Settings(ConfigurableResource):
    """The S3 client's settings: the fields (and so the run config) of dagster-aws's `S3Resource`, which is not
    used because importing its package loads Dagster's test utilities, ~0.6 s in every process (each run, each
    step, each code-location load) even where nothing is on S3. boto3 is imported only for an s3:// URI."""

    use_unsigned_session: bool = Field(default=False, description="Send requests unsigned (a public bucket).")
    region_name: str | None = Field(default=None, description="Region; unset: boto3's (AWS_REGION, profile).")
    endpoint_url: str | None = Field(default=None, description="Endpoint; unset: boto3's (AWS_ENDPOINT_URL).")
    max_attempts: int = Field(default=5, ge=1, description="boto3's attempts per request, the first included.")
    profile_name: str | None = Field(default=None, description="Profile of the AWS config files.")
    use_ssl: bool = Field(default=True, description="Use TLS.")
    verify: bool | None = Field(default=None, description="Verify TLS certificates; unset: verified.")
    aws_access_key_id: str | None = Field(default=None, description="Unset: boto3's credential chain.")
    aws_secret_access_key: str | None = Field(default=None, description="Give it as an EnvVar.")
    aws_session_token: str | None = Field(default=None, description="Give it as an EnvVar.")

    def get_client(self) -> Any:
        import boto3
        from botocore import UNSIGNED

        config = s3_config(
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            signature_version=UNSIGNED if self.use_unsigned_session else None,
        )
        return boto3.session.Session(profile_name=self.profile_name).client(
            "s3",
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=config,
        )


class DatasetResource(ConfigurableResource):
    """Where the images are and where results go: local folders or `s3://bucket/prefix` URIs."""

    dataset_uri: str = Field(description="Folder or s3://bucket/prefix holding the images.")
    output_uri: str = Field(description="Folder or s3://bucket/prefix for normal maps, inventory and manifest.")
    s3: S3Settings = Field(default_factory=S3Settings, description="S3 client settings (endpoint, region, ...).")

    def dataset(self) -> Storage:
        return self._open(self.dataset_uri)

    def output(self) -> Storage:
        return self._open(self.output_uri)

    def _open(self, uri: str) -> Storage:
        return open_storage(uri, s3_client=self.s3.get_client() if uri.startswith("s3://") else None)
