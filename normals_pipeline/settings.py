"""One key's settings, and a run's client over the key's guards: what every shell (the Dagster resource, the
Airflow hook, a script) hands the core, so each builds the client, the claims and the plan the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ._state import take_set_aside_warnings
from .client import DEFAULT_API_URL, ClipdropClient, RetryPolicy, check_api_url
from .enrich import MAX_IN_FLIGHT, Item, PlanReads, ShardResult, enrich_shards
from .guards import MAX_TIMEOUT_S, CreditGuard, claim_store, key_fingerprint, key_state, rate_guard_for
from .plan import Plan, make_plan
from .prepare import Oversize

if TYPE_CHECKING:
    import pyarrow as pa

    from ._state import ClaimStore
    from .storage import Storage


@dataclass(frozen=True)
class ClipdropSettings:
    """`api_key` may be empty where only the plan is wanted (the balance is then unknown); it is never shown."""

    api_key: str = field(repr=False)
    api_url: str = DEFAULT_API_URL
    requests_per_minute: int = 60
    concurrency: int | None = None
    credit_floor: Decimal = Decimal(0)
    run_budget: Decimal | None = None
    timeout_s: float = 60.0
    max_attempts: int = 6
    oversize: Oversize = "downscale"
    redis_url: str | None = None

    def __post_init__(self) -> None:
        """Refused when the settings are made (a connection, a resource), in one line, not at the first request."""
        check_api_url(self.api_url)
        refused = {
            "requests_per_minute must be >= 1": self.requests_per_minute < 1,
            "concurrency must be >= 1": self.concurrency is not None and self.concurrency < 1,
            "credit_floor must be >= 0": self.credit_floor < 0,
            "run_budget must be >= 0": self.run_budget is not None and self.run_budget < 0,
            f"timeout must be over 0 and at most {MAX_TIMEOUT_S:g} s": not 0 < self.timeout_s <= MAX_TIMEOUT_S,
            "max_attempts must be >= 1": self.max_attempts < 1,
            f"oversize must be downscale or refuse, not {self.oversize!r}": self.oversize
            not in ("downscale", "refuse"),
        }
        problems = [message for message, bad in refused.items() if bad]
        if problems:
            raise ValueError("; ".join(problems))

    @contextmanager
    def open_client(self) -> Iterator[ClipdropClient]:
        """A client for one run: the rate guard is shared by the process, the credit guard is the run's."""
        rate_guard = rate_guard_for(self.api_key, self.requests_per_minute, self.redis_url)
        client = ClipdropClient(
            self.api_key,
            base_url=self.api_url,
            rate_guard=rate_guard,
            credit_guard=CreditGuard(floor=self.credit_floor, budget=self.run_budget, state=rate_guard.state),
            timeout_s=self.timeout_s,
            retry=RetryPolicy(attempts=self.max_attempts),
            max_connections=self.concurrency or MAX_IN_FLIGHT,
        )
        try:
            yield client
        finally:
            client.close()

    def enrich(
        self,
        dataset: Storage,
        output: Storage,
        shards: list[tuple[str, list[Item]]],
        *,
        warn: Callable[[str], None],
        **callbacks: Any,
    ) -> dict[str, ShardResult]:
        """`enrich_shards` with this key's client and claims (`callbacks`: its `progress`, `notify`, `on_shard`,
        `reads`); `warn` hears of state this process had to set aside to open."""
        with self.open_client() as client:
            claims = self.claim_store()
            for warning in take_set_aside_warnings():
                warn(warning)
            return enrich_shards(
                dataset,
                output,
                client,
                shards,
                concurrency=self.concurrency,
                oversize=self.oversize,
                claims=claims,
                **callbacks,
            )

    def claim_store(self) -> ClaimStore:
        """Claims (one sender per content, one writer per shard) where every run can see them: the
        same place as the key's guards, Redis with `redis_url`, else this host's SQLite file."""
        return claim_store(self.redis_url)

    def known_balance(self) -> tuple[Decimal, float] | None:
        """The key's last reported balance and its age, from its shared state; unknown without a key."""
        return key_state(self.api_key, self.redis_url).known_balance() if self.api_key else None

    def plan(
        self, dataset: Storage, output: Storage, inventory: pa.Table, shards: int, keep: PlanReads | None = None
    ) -> Plan:
        """What the next run with these settings would send and charge, from `inventory`: no request, no write.
        `keep`: where to leave what was read for that run, when it follows in this process (see `PlanReads`)."""
        return make_plan(
            dataset,
            output,
            shards,
            inventory=inventory,
            rpm=self.requests_per_minute,
            concurrency=self.concurrency,
            oversize=self.oversize,
            claims=self.claim_store(),
            balance=self.known_balance(),
            keep=keep,
        )

    def shortfall(self, plan: Plan) -> str | None:
        """Why a run would not fit the key's balance less `credit_floor`, or `run_budget`; None if it would."""
        return plan.shortfall(self.credit_floor, self.run_budget)

    def pool(self, prefix: str = "clipdrop") -> str:
        """A name for the orchestrator's pool of this key: its fingerprint, never the key."""
        return f"{prefix}_{key_fingerprint(self.api_key)}"
