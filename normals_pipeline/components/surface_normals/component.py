"""`SurfaceNormalsComponent`: the pipeline for one dataset, declared in a `dg` project's `defs.yaml`.

A thin shell over `normals_pipeline.orchestration.factory.normals_definitions`: it only resolves the YAML
attributes into that call. Its one rule of its own is about the key: `api_key` must be an environment
reference (`"{{ env.CLIPDROP_API_KEY }}"`), which becomes `dagster.EnvVar("CLIPDROP_API_KEY")`: the template is
never rendered, so the key's value is not read at load time, never stored in the definitions and never shown
in the UI's resource configuration. A key written into the YAML is refused.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from dagster.components.core.decl import YamlBackedComponentDecl
from dagster.components.resolved.errors import ResolutionException
from pydantic import ConfigDict, Field, field_validator

from ...client import DEFAULT_API_URL
from ...orchestration.automation import Automation
from ...orchestration.factory import DEFAULT_KEY_ENV, normals_definitions, refuse_shared_outputs
from ...orchestration.partitions import DEFAULT_SHARDS, DEFAULT_SHARDS_PER_RUN
from ...training import DEFAULT_SPLITS, MIN_PERSON_FRACTION, check_splits
from .scaffolder import SurfaceNormalsScaffolder

# `{{ env.NAME }}` or `{{ env('NAME') }}`, the whole value, nothing else (no default, no expression).
_ENV_REFERENCE = re.compile(
    r"""^\{\{\s*env\s*(?:\.\s*(?P<attr>[A-Za-z_][A-Za-z0-9_]*)|\(\s*(?P<q>['"])(?P<call>[A-Za-z_][A-Za-z0-9_]*)(?P=q)\s*\))\s*\}\}$"""
)


def env_reference(value: object) -> str | None:
    """The variable named by an `{{ env.NAME }}` / `{{ env('NAME') }}` template, else None."""
    if not isinstance(value, str):
        return None
    match = _ENV_REFERENCE.match(value.strip())
    return (match["attr"] or match["call"]) if match else None


# the same references anywhere in a value, as `dg list env` and `dg check yaml --validate-requirements` find them
_ENV_ANYWHERE = re.compile(r"""\{\{\s*env\s*(?:\.\s*(\w+)|\(\s*['"](\w+)['"]\s*\))""")


def referenced_env_vars(value: object) -> set[str]:
    """The environment variables a YAML value (a string, or lists and mappings of them) references."""
    if isinstance(value, str):
        return {attr or call for attr, call in _ENV_ANYWHERE.findall(value)}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(referenced_env_vars(item) for item in value))
    return set()


def _where(context: dg.ResolutionContext) -> str:
    """`defs.yaml:12: ` for the value being resolved: the place only, never a snippet of the file (the
    snippet Dagster would print shows the value, and the value may be a key)."""
    tree = context.source_position_tree
    if tree is None:
        return ""
    try:
        position, _ = tree.lookup_closest_and_path(context.path, trace=None)
        return f"{position.filename}:{position.start.line}: "
    except Exception:  # the location is a courtesy; the message stands without it
        return ""


def resolve_api_key(context: dg.ResolutionContext, value: Any) -> dg.EnvVar:
    """`"{{ env.NAME }}"` → `EnvVar("NAME")`, read by Dagster when a run starts; anything else is refused
    (without repeating the value, which may be the key)."""
    name = env_reference(value)
    if name is None:
        raise ResolutionException(
            f"{_where(context)}{'.'.join(map(str, context.path))} must name the environment variable "
            f'that holds the key, e.g. "{{{{ env.{DEFAULT_KEY_ENV} }}}}", not hold the key itself: a key written '
            "in defs.yaml is stored with the project and shown in the Dagster UI's resource configuration. Set "
            "the variable where Dagster runs (or in the project's .env) instead."
        )
    return dg.EnvVar(name)


def resolve_location(context: dg.ResolutionContext, value: Any) -> str:
    """A folder or `s3://` URI after templating; an unset `{{ env.X }}` (None) or an empty value is refused
    with the attribute's name rather than as a type error."""
    resolved = context.resolve_value(value)
    if resolved is None or (isinstance(resolved, str) and not resolved.strip()):
        hint = f" ({value!r} is unset)" if env_reference(value) else ""
        raise ResolutionException(
            f"{_where(context)}{'.'.join(map(str, context.path))} is empty{hint}: write a folder or an "
            "s3://bucket/prefix in defs.yaml, or set the environment variable it names."
        )
    if not isinstance(resolved, str | Path):
        raise ResolutionException(
            f"{_where(context)}{'.'.join(map(str, context.path))} must be a folder or an "
            f"s3://bucket/prefix, got a {type(resolved).__name__}"
        )
    return str(resolved)


ApiKey = Annotated[
    dg.EnvVar,
    dg.Resolver(
        resolve_api_key,
        model_field_type=str,
        inject_before_resolve=False,  # never render the template: the key's value stays out of the process
        description=(
            "The environment variable holding the Clipdrop API key, as a reference: "
            f'"{{{{ env.{DEFAULT_KEY_ENV} }}}}". It is passed on as dagster.EnvVar, read when a run starts; '
            "the key itself is refused here."
        ),
        examples=[f"{{{{ env.{DEFAULT_KEY_ENV} }}}}"],
        # what the schema and the UI show as the default (the model's own is Dagster's "unset" marker)
        json_schema_extra={"default": f"{{{{ env.{DEFAULT_KEY_ENV} }}}}"},
    ),
]


def _doc(description: str, example: Any) -> dg.Resolver:
    """Default resolution (templates allowed), with the description and example the YAML schema, `dg` and the
    UI show."""
    return dg.Resolver.default(description=description, examples=[example])


def _location_field(what: str, examples: list[str]) -> Any:
    return dg.Resolver(
        resolve_location,
        model_field_type=str,
        inject_before_resolve=False,
        description=what,
        examples=examples,
    )


@dg.scaffold_with(SurfaceNormalsScaffolder)
class SurfaceNormalsComponent(dg.Component, dg.Model, dg.Resolvable):
    """Portrait surface normals from the Clipdrop API for one image dataset.

    Defines, under `key_prefix`: the asset `image_inventory` (the dataset listed into the output),
    `surface_normals` partitioned by hash shard (a JPEG normal map and a Parquet manifest row per image; each
    image sent once), `training_pairs` partitioned alike (each image as sent next to its normal map, for
    training), the asset check `manifest_schema`, the jobs `refresh_inventory` and `enrich_shard`, the sensor
    `new_images_sensor` and the schedule `daily_inventory_schedule` (both off unless enabled here), and their
    resources. With `automation` (eager or on_cron) new images are enriched by Dagster's declarative automation
    instead: the dataset is observed (`dataset`, `dataset_shards`) and a sensor of its own evaluates the conditions.
    Job, sensor, schedule and resource names start with `<key_prefix joined by _>__`, so several instances (one
    per dataset) load into one code location; they must not share an `output` (refused when they load).

    Every instance on one key shares that key's rate limit and credit balance (the guards keep their state
    per key, on this host or in `redis_url`) and, unless `pool` is set, one Dagster concurrency pool per key.
    `api_key` is an environment reference (`"{{ env.CLIPDROP_API_KEY }}"`) passed on as `dagster.EnvVar`:
    the key is never stored or shown.

    Scaffold with `dg scaffold defs normals_pipeline.SurfaceNormalsComponent <name>`, then set `dataset`
    and `output` in the new `defs.yaml`.
    """

    # Pydantic errors would otherwise print the offending value, which for `api_key` may be the key.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, hide_input_in_errors=True)

    dataset: Annotated[
        str,
        _location_field(
            "Folder or s3://bucket/prefix holding the images (a relative folder is under the project root).",
            ["data/portraits", "s3://bucket/portraits"],
        ),
    ]
    output: Annotated[
        str,
        _location_field(
            "Folder or s3://bucket/prefix for normal maps, inventory and manifest (not inside the dataset; one "
            "output per instance).",
            ["enriched/portraits", "s3://bucket/enriched/portraits"],
        ),
    ]
    shards: Annotated[int, Field(ge=1), _doc("Partitions of surface_normals (hash shards of the path).", 16)] = (
        DEFAULT_SHARDS
    )
    shards_per_run: Annotated[
        int, Field(ge=1), _doc("Shards one backfill run covers (BackfillPolicy.multi_run).", 16)
    ] = DEFAULT_SHARDS_PER_RUN
    api_key: ApiKey = dg.EnvVar(DEFAULT_KEY_ENV)
    api_url: Annotated[str, _doc("API base URL (or the emulator's).", DEFAULT_API_URL)] = DEFAULT_API_URL
    requests_per_minute: Annotated[
        int, Field(ge=1), _doc("The key's rate limit, shared by every run and instance on the key.", 60)
    ] = 60
    concurrency: Annotated[
        Annotated[int, Field(ge=1)] | None,
        _doc("Images in flight per run; null: follows the key's rate and latency.", 8),
    ] = None
    credit_floor: Annotated[
        float, Field(ge=0), _doc("Stop sending before the key's balance would drop below this.", 100.0)
    ] = 0.0
    run_budget: Annotated[
        Annotated[float, Field(ge=0)] | None, _doc("Most credits one run may spend; null: no limit.", 500.0)
    ] = None
    timeout_seconds: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False),
        _doc("Most seconds one request may take, connecting to the answer's last byte; then it is a timeout.", 120.0),
    ] = 60.0
    redis_url: Annotated[
        str | None,
        _doc(
            "redis://host:6379/0 to share the key's rate and credits across hosts; null: this host's processes.",
            "redis://redis:6379/0",
        ),
    ] = None
    oversize: Annotated[
        Literal["downscale", "refuse"],
        _doc("Images over 25 megapixels: downscale them to fit, or refuse them.", "downscale"),
    ] = "downscale"
    key_prefix: Annotated[
        str | list[str] | None,
        _doc(
            "Asset key prefix (a string or a list; letters, digits, '_'), also the start of job, sensor, schedule "
            "and resource names; distinct per instance. null: no prefix.",
            "portraits",
        ),
    ] = None
    group: Annotated[str, _doc("Asset group.", "normals")] = "normals"
    pool: Annotated[
        str | None, _doc("Dagster concurrency pool of surface_normals; null: one pool per key.", "clipdrop")
    ] = None
    sensor_enabled: Annotated[bool, _doc("Start new_images_sensor on (it enriches new images).", True)] = False
    schedule_enabled: Annotated[bool, _doc("Start daily_inventory_schedule on.", True)] = False
    schedule_cron: Annotated[
        str,
        _doc("Cron of daily_inventory_schedule, and of the dataset's listing with automation: on_cron.", "0 2 * * *"),
    ] = "0 2 * * *"
    training_pairs: Annotated[
        bool,
        _doc(
            "Define training_pairs: each enriched image as sent next to its normal map, as Parquet under "
            "<output>/training/parquet/, built in the same runs as surface_normals.",
            True,
        ),
    ] = True
    training_splits: Annotated[
        dict[str, float],
        _doc(
            "Fractions of train, validation and test (each >= 0, summing to 1); an image's split follows from "
            "its content, so it never moves and duplicates share it.",
            {"train": 0.8, "validation": 0.1, "test": 0.1},
        ),
    ] = dict(DEFAULT_SPLITS)
    webdataset: Annotated[
        bool, _doc("Also write the training pairs as WebDataset tars (img2dataset's layout).", True)
    ] = False
    min_person_fraction: Annotated[
        float,
        Field(ge=0, le=1),
        _doc(
            "A map whose person mask covers less of it is left out of the training pairs as no_person (the API "
            "returns a flat map when it finds no one); the check normal_map_quality counts them.",
            0.01,
        ),
    ] = MIN_PERSON_FRACTION
    keep_no_person: Annotated[
        bool, _doc("Keep the no_person maps as training pairs (still counted by normal_map_quality).", False)
    ] = False
    export_layouts: Annotated[
        list[Literal["sapiens", "marigold", "dsine"]],
        _doc(
            "Trainers' folder layouts written from the training pairs in the same runs, under "
            "<output>/training/<layout>/, each in its trainer's normal convention; kept when nothing changed.",
            ["sapiens"],
        ),
    ] = []
    automation: Annotated[
        Automation,
        _doc(
            "Enrich new images with no sensor (Dagster's declarative automation): eager lists the dataset every "
            "minute, on_cron on schedule_cron; when the listing changed the inventory is taken again and the shards "
            "with new or changed images run. none: nothing is requested, so nothing spends credits unasked. Not "
            "with sensor_enabled or schedule_enabled.",
            "eager",
        ),
    ] = "none"
    owners: Annotated[
        list[str], _doc("Owners of every asset: emails or team:name.", ["team:vision", "ml-ops@example.com"])
    ] = []

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_by_reference(cls, value: Any) -> Any:
        """From Python too, the key comes as `dg.EnvVar("NAME")` (from YAML the resolver has made one)."""
        if isinstance(value, dg.EnvVar):
            return value
        raise ValueError(
            f'api_key must be dagster.EnvVar("{DEFAULT_KEY_ENV}") (or another variable), not the key: a plain '
            "string is shown in the Dagster UI's resource configuration"
        )

    @field_validator("training_splits")
    @classmethod
    def _splits_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        return check_splits(value)

    @classmethod
    def get_spec(cls) -> dg.ComponentTypeSpec:
        return dg.ComponentTypeSpec(tags=["clipdrop", "enrichment", "images"])

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        if isinstance(context.component_decl, YamlBackedComponentDecl):  # in a defs folder, beside its siblings
            refuse_shared_outputs(
                (other.instance_name, _under(context.project_root, other.output))
                for other in context.component_tree.get_all_components(of_type=SurfaceNormalsComponent)
            )
            self._warn_unread_requirements(context.component_decl, context.path.relative_to(context.project_root))
        return normals_definitions(
            dataset=_under(context.project_root, self.dataset),
            output=_under(context.project_root, self.output),
            shards=self.shards,
            shards_per_run=self.shards_per_run,
            api_key=self.api_key,
            api_url=self.api_url,
            requests_per_minute=self.requests_per_minute,
            concurrency=self.concurrency,
            credit_floor=self.credit_floor,
            run_budget=self.run_budget,
            timeout_seconds=self.timeout_seconds,
            redis_url=self.redis_url,
            oversize=self.oversize,
            key_prefix=self.key_prefix,
            group=self.group,
            pool=self.pool,
            sensor_enabled=self.sensor_enabled,
            schedule_enabled=self.schedule_enabled,
            schedule_cron=self.schedule_cron,
            training_pairs=self.training_pairs,
            training_splits=self.training_splits,
            webdataset=self.webdataset,
            min_person_fraction=self.min_person_fraction,
            keep_no_person=self.keep_no_person,
            export_layouts=self.export_layouts,
            automation=self.automation,
            owners=self.owners,
        )

    @property
    def instance_name(self) -> str:
        """How a refusal names this instance: its key prefix."""
        prefix = [self.key_prefix] if isinstance(self.key_prefix, str) else self.key_prefix or []
        return "/".join(prefix) or "(no key_prefix)"

    def _warn_unread_requirements(self, decl: YamlBackedComponentDecl, where: Path) -> None:
        """`dg list env` reads `requirements.env` as written, so variables left there after a path was written in
        (the scaffolded NORMALS_DATASET, NORMALS_OUTPUT) would be asked for: name them."""
        model = decl.component_file_model
        if model is None or model.requirements is None:
            return
        read = referenced_env_vars(model.model_dump(exclude={"requirements"})) | {self.api_key.env_var_name}
        unread = sorted(set(model.requirements.env or ()) - read)
        if unread:
            logging.getLogger("dagster").warning(
                f"{where}: requirements.env lists {', '.join(unread)}, which no attribute reads: remove "
                f"{'it' if len(unread) == 1 else 'them'} (`dg list env` shows that list as what the project needs)",
            )


def _under(project_root: Path, location: str) -> str:
    """A relative folder is the project's, whatever the working directory of the process loading it."""
    if "://" in location or Path(location).is_absolute():
        return location
    return str((Path(project_root) / location).resolve())
