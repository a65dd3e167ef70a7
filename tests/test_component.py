"""`SurfaceNormalsComponent` in a user's `dg` project, driven only through the `dg` CLI.

The project is written by hand in a temporary folder (`dg scaffold project` would create a venv with uv and
install from the network); it runs on this venv, where this package is installed editable, so `dg` finds the
component through the package's `dagster_dg_cli.registry_modules` entry point as a user's install would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml

from normals_pipeline import SurfaceNormalsComponent
from normals_pipeline.emulator import Emulator
from normals_pipeline.synthetic import make_portraits

# Dagster's YAML loading calls pydantic's deprecated `parse_obj_as` (dagster/_utils/pydantic_yaml.py)
pytestmark = pytest.mark.filterwarnings("ignore:`parse_obj_as` is deprecated:DeprecationWarning")

BIN = Path(sys.executable).parent
COMPONENT = "normals_pipeline.SurfaceNormalsComponent"
KEY = "test-key"
RPM = 20  # one request per 3 s on the key, whichever instance sends it
IMAGES = 3  # per dataset: 6 requests on the key, ~15 s

# every attribute and the default the scaffolded defs.yaml must show
DEFAULTS = {
    "shards": 16,
    "shards_per_run": 16,
    "api_key": "{{ env.CLIPDROP_API_KEY }}",
    "api_url": "https://clipdrop-api.co",
    "requests_per_minute": 60,
    "concurrency": None,
    "credit_floor": 0.0,
    "run_budget": None,
    "timeout_seconds": 60.0,
    "redis_url": None,
    "oversize": "downscale",
    "group": "normals",
    "pool": None,
    "sensor_enabled": False,
    "schedule_enabled": False,
    "schedule_cron": "0 2 * * *",
    "training_pairs": True,
    "training_splits": {"train": 0.9, "validation": 0.05, "test": 0.05},
    "webdataset": False,
    "min_person_fraction": 0.01,
    "keep_no_person": False,
    "export_layouts": [],
    "automation": "none",
    "owners": [],
}


def _project(root: Path) -> Path:
    (root / "portraits_app" / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "portraits-app"
            version = "0.1.0"
            requires-python = ">=3.11"
            dependencies = ["normals-pipeline"]

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "portraits_app"

            [tool.dg.cli.telemetry]
            enabled = false
            """
        )
    )
    (root / "portraits_app" / "__init__.py").write_text("")
    (root / "portraits_app" / "defs" / "__init__.py").write_text("")
    (root / "portraits_app" / "definitions.py").write_text(
        textwrap.dedent(
            """\
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs() -> dg.Definitions:
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    return root


def _dg_run(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dg"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)


def _dg(project: Path, env: dict[str, str], *args: str) -> str:
    done = _dg_run(project, env, *args)
    assert done.returncode == 0, f"dg {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _step_spans(home: Path) -> list[tuple[float, float]]:
    """When each run's surface_normals step started and succeeded, from the instance's event log (the runs'
    stdout is not enough: two processes write each run's log lines into one pipe, and lines can interleave)."""
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    spans = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs():
            times = {
                entry.dagster_event_type: entry.timestamp
                for entry in instance.all_logs(run.run_id, of_type=kinds)
                if entry.step_key and entry.step_key.endswith("__surface_normals")
            }
            assert times.keys() == kinds, (run.run_id, times)
            spans.append((times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]))
    return spans


def test_two_instances_scaffolded_checked_and_run_on_one_key(tmp_path: Path, emulator_factory) -> None:
    emulator: Emulator = emulator_factory(rpm=RPM, latency=0.2)
    project = _project(tmp_path / "project")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:  # its SQLite files exist before two runs start
        instance.get_runs_count()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CLIPDROP_API_KEY": KEY,
        "NORMALS_STATE_DIR": str(tmp_path / "state"),
        "DAGSTER_HOME": str(home),
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("NORMALS_DATASET", None)
    env.pop("NORMALS_OUTPUT", None)

    components = json.loads(_dg(project, env, "list", "components", "--json"))
    listed = {entry["key"]: entry for entry in components["items"]}
    assert COMPONENT in listed, sorted(listed)

    for name in ("portraits_a", "portraits_b"):
        _dg(project, env, "scaffold", "defs", COMPONENT, name)

    # the scaffolded file: every attribute with its default, the key as a reference, placeholders to edit
    for name in ("portraits_a", "portraits_b"):
        text = (project / "portraits_app" / "defs" / name / "defs.yaml").read_text()
        scaffolded = yaml.safe_load(text)
        assert scaffolded["type"] == COMPONENT
        attributes = scaffolded["attributes"]
        assert {key: attributes[key] for key in DEFAULTS} == DEFAULTS
        assert attributes["dataset"] == "{{ env.NORMALS_DATASET }}"
        assert attributes["output"] == "{{ env.NORMALS_OUTPUT }}"
        assert attributes["key_prefix"] == name
        assert set(attributes) == {*DEFAULTS, "dataset", "output", "key_prefix"}
        assert scaffolded["requirements"]["env"] == ["CLIPDROP_API_KEY", "NORMALS_DATASET", "NORMALS_OUTPUT"]
    # as scaffolded, the YAML is valid and the definitions say what to fill in
    _dg(project, env, "check", "yaml", "--validate-requirements")
    unfilled = subprocess.run(
        [str(BIN / "dg"), "check", "defs"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert unfilled.returncode != 0
    assert "attributes.dataset is empty" in unfilled.stdout + unfilled.stderr

    # two datasets, two outputs, one emulator and one key; one shard each, so partition 00 holds every image
    for name, seed in (("portraits_a", 1), ("portraits_b", 2)):
        make_portraits(tmp_path / "data" / name, IMAGES, seed=seed)
        path = project / "portraits_app" / "defs" / name / "defs.yaml"
        document = yaml.safe_load(path.read_text())
        document["attributes"].update(
            dataset=str(tmp_path / "data" / name),
            output=f"enriched/{name}",  # relative: under the project root
            api_url=emulator.url,
            requests_per_minute=RPM,
            shards=1,
        )
        path.write_text(yaml.safe_dump(document, sort_keys=False))

    _dg(project, env, "check", "yaml")
    # the paths are written in: the scaffolded requirements.env still names their variables, and is told so
    stale = _dg_run(project, env, "check", "defs")
    assert stale.returncode == 0, stale.stdout + stale.stderr
    for name in ("portraits_a", "portraits_b"):
        assert (
            f"defs/{name}: requirements.env lists NORMALS_DATASET, NORMALS_OUTPUT, which no attribute reads: "
            "remove them"
        ) in stale.stdout, stale.stdout
    for name in ("portraits_a", "portraits_b"):
        path = project / "portraits_app" / "defs" / name / "defs.yaml"
        document = yaml.safe_load(path.read_text())
        document["requirements"]["env"] = ["CLIPDROP_API_KEY"]
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert "requirements.env lists" not in _dg(project, env, "check", "defs")
    listed = _dg(project, env, "list", "env")
    assert "CLIPDROP_API_KEY" in listed and "NORMALS_DATASET" not in listed and "NORMALS_OUTPUT" not in listed

    # two instances on one output are refused in one line naming both
    path_b = project / "portraits_app" / "defs" / "portraits_b" / "defs.yaml"
    text_b = path_b.read_text()
    path_b.write_text(text_b.replace("enriched/portraits_b", "enriched/portraits_a/"))
    shared = _dg_run(project, env, "check", "defs")
    assert shared.returncode != 0
    assert (
        f"the instances portraits_a and portraits_b share the output {project / 'enriched' / 'portraits_a'}: "
        "give each its own output"
    ) in shared.stdout + shared.stderr
    path_b.write_text(text_b)

    _dg(project, env, "check", "defs")
    defs = json.loads(_dg(project, env, "list", "defs", "--json"))
    assets = {asset["asset_key"] for asset in defs["assets"]}
    for name in ("portraits_a", "portraits_b"):
        assert {f"{name}/image_inventory", f"{name}/surface_normals", f"{name}/training_pairs"} <= assets
    # the key never reaches the definitions: the resource holds a reference
    assert KEY not in json.dumps(defs)

    # both instances at once, each a run of its inventory and its one shard
    launches = [
        subprocess.Popen(
            [
                str(BIN / "dg"),
                "launch",
                "--assets",
                f"{name}/image_inventory,{name}/surface_normals,{name}/training_pairs",
                "--partition",
                "00",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("portraits_a", "portraits_b")
    ]
    outputs = [launch.communicate(timeout=180)[0] for launch in launches]
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output
        assert KEY not in output
    # ... and they were enriching at the same time
    (start_a, end_a), (start_b, end_b) = _step_spans(home)
    assert start_a < end_b and start_b < end_a, (start_a, end_a, start_b, end_b)

    stats = emulator.stats()
    assert stats["by_status"].get("200") == 2 * IMAGES, stats
    assert stats["by_status"].get("429", 0) == 0, stats
    assert stats["max_in_any_60s"] <= RPM, stats
    # 6 requests are too few to reach the limit in a window, so also look at their spacing: one schedule
    # for the key across both processes (a slot every 60/RPM s; a late key catches up at twice the pace)
    arrivals = sorted(emulator._service._log[KEY])  # the emulator's own arrival times (no public accessor)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.4 * 60 / RPM, gaps
    for name in ("portraits_a", "portraits_b"):
        output = project / "enriched" / name
        assert len(list((output / "normals").rglob("*.jpg"))) == IMAGES
        assert (output / "manifest" / "partition=00" / "manifest.parquet").is_file()
        assert list((output / "training" / "parquet" / "partition=00").glob("*.parquet"))  # built in the same run


def _component(api_key: str) -> SurfaceNormalsComponent:
    return SurfaceNormalsComponent.resolve_from_yaml(
        f"dataset: /data/portraits\noutput: /data/enriched\nkey_prefix: portraits\napi_key: {api_key}\n"
    )


@pytest.mark.parametrize("reference", ['"{{ env.MY_CLIPDROP_KEY }}"', "\"{{ env('MY_CLIPDROP_KEY') }}\""])
def test_api_key_reference_becomes_an_env_var(reference: str, monkeypatch) -> None:
    monkeypatch.setenv("MY_CLIPDROP_KEY", "sk-the-secret")
    component = _component(reference)
    assert isinstance(component.api_key, dg.EnvVar) and component.api_key.env_var_name == "MY_CLIPDROP_KEY"
    defs = component.build_defs(dg.ComponentTree.for_test().load_context)
    resource = defs.resources["portraits__clipdrop"]
    assert isinstance(resource.api_key, dg.EnvVar) and resource.api_key.env_var_name == "MY_CLIPDROP_KEY"
    assert "sk-the-secret" not in repr(resource)
    # omitted: the usual variable
    default = SurfaceNormalsComponent.resolve_from_yaml("dataset: /d\noutput: /o\n")
    assert isinstance(default.api_key, dg.EnvVar) and default.api_key.env_var_name == "CLIPDROP_API_KEY"


@pytest.mark.parametrize("written", ["sk-the-secret", "\"{{ env.MY_CLIPDROP_KEY ~ 'x' }}\"", '""'])
def test_a_key_written_in_the_yaml_is_refused_without_repeating_it(written: str) -> None:
    with pytest.raises(Exception, match="api_key must name the environment variable") as refused:
        _component(written)
    assert "the-secret" not in str(refused.value)
    with pytest.raises(ValueError, match="api_key must be dagster.EnvVar") as refused:
        SurfaceNormalsComponent(dataset="/d", output="/o", api_key="sk-the-secret")
    assert "the-secret" not in str(refused.value)


def test_registered_with_its_docs_and_the_core_still_imports_without_dagster() -> None:
    from dagster.components.core.load_defs import (
        PLUGIN_COMPONENT_TYPES_JSON_METADATA_KEY,
        get_library_json_enriched_defs,
    )

    # what `dg` and the UI's component documentation read: the entry point's components with their docs
    namespaces = get_library_json_enriched_defs(None).metadata[PLUGIN_COMPONENT_TYPES_JSON_METADATA_KEY].value
    entries = {entry["name"]: entry for namespace in namespaces for entry in namespace["componentTypes"]}
    entry = entries[COMPONENT]
    assert entry["description"].startswith("Portrait surface normals from the Clipdrop API")
    schema = json.loads(entry["schema"])
    assert set(schema["properties"]) == {*DEFAULTS, "dataset", "output", "key_prefix"}
    assert set(schema["required"]) == {"dataset", "output"}
    assert all(schema["properties"][name].get("description") for name in schema["properties"])
    assert "api_key: '{{ env.CLIPDROP_API_KEY }}'" in entry["example"]

    code = "import sys, normals_pipeline; assert 'dagster' not in sys.modules, 'the core imported dagster'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_env_variables_an_attribute_reads_are_found_as_dg_finds_them() -> None:
    from normals_pipeline.components.surface_normals.component import referenced_env_vars

    attributes = {
        "dataset": "{{ env.DATA_ROOT }}/portraits",
        "output": "/data/enriched",
        "api_key": "{{ env('TEAM_KEY') }}",
        "owners": ["team:{{ env.TEAM }}"],
        "training_splits": {"train": 1.0},
    }
    assert referenced_env_vars(attributes) == {"DATA_ROOT", "TEAM_KEY", "TEAM"}
