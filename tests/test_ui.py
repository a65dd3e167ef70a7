"""The Dagster UI in a real browser, as `make dev` serves it: Debian's Chromium (driven by playwright) launches
"Materialize all" by clicking, waits for every shard, and checks what the pages show. Screenshots go to
tests/screenshots/ (git-ignored).

Runs only under `make ui-test` (NORMALS_UI_TEST=1, the `ui` extra, /usr/bin/chromium); plain `pytest` skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if os.environ.get("NORMALS_UI_TEST") != "1":
    pytest.skip("the browser test runs with `make ui-test` (NORMALS_UI_TEST=1)", allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip("the browser test needs Debian's Chromium: apt-get install -y chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the `ui` extra (playwright)")

from normals_pipeline.emulator import Emulator, EmulatorConfig  # noqa: E402
from normals_pipeline.manifest import COLUMNS, manifest_keys, read_manifest  # noqa: E402
from normals_pipeline.storage import LocalStorage  # noqa: E402
from normals_pipeline.synthetic import make_portraits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "tests" / "screenshots"
BIN = Path(sys.executable).parent
ASSET = "surface_normals"
SHARDS = 16
IMAGES = 24  # as `make dev`
KEY = "ui-test-key"
RPM = 600  # the emulator's and the resource's: the test is about the UI, not the pacing
START_TIMEOUT_S = 180
BACKFILL_TIMEOUT_S = 420
WARNING = re.compile(r"\bWARNING\b|Warning:")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DevServer:
    url: str
    log: Path
    output: Path
    process: subprocess.Popen

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = json.loads(answer.read())
        assert "errors" not in body, body["errors"]
        return body["data"]

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the dev server exited ({self.process.returncode}):\n{self.log_tail()}")


def _dev_command(port: int) -> list[str]:
    """`dg dev` as `make dev` runs it (`dagster dev` if `dg` is not installed)."""
    workspace = ["-w", str(REPO / "workspace.yaml"), "-p", str(port), "-h", "127.0.0.1"]
    if (BIN / "dg").exists():
        return [str(BIN / "dg"), "dev", *workspace]
    return [str(BIN / "dagster"), "dev", *workspace]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to `dg dev`, which stops its webserver, daemon and code servers; then SIGKILL to whatever of its
    process group (run workers included) is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory) -> Iterator[DevServer]:
    """The emulator and `dg dev` on the repo's workspace, like `make dev`: synthetic portraits, the repo's
    dagster.yaml in a fresh DAGSTER_HOME that is also the folder it starts from, free ports."""
    root = tmp_path_factory.mktemp("ui")
    make_portraits(root / "portraits", IMAGES)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    emulator = Emulator(EmulatorConfig(keys={KEY: Decimal(1000)}, rpm=RPM, latency=0.05)).start()
    port = _free_port()
    env = {
        **os.environ,
        "NORMALS_DATASET": str(root / "portraits"),
        "NORMALS_OUTPUT": str(root / "enriched"),
        "CLIPDROP_API_URL": emulator.url,
        "CLIPDROP_API_KEY": KEY,
        "CLIPDROP_RPM": str(RPM),
        "DAGSTER_HOME": str(home),
        "NORMALS_STATE_DIR": str(root / "state"),
        "PYTHONPATH": str(REPO),  # the code under test, whichever checkout the venv was installed from
    }
    log = root / "dev.log"
    # Caught here, SIGINT is back to its default in the child, however this process was started (a background
    # job starts with it ignored, and `dg dev` would then ignore SIGTERM too, as the same handler).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                _dev_command(port), cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    server = DevServer(f"http://127.0.0.1:{port}", log, root / "enriched", process)
    try:
        _wait_until_loaded(server)
        yield server
    finally:
        _stop(process)
        emulator.stop()
        if SCREENSHOTS.exists():
            shutil.copy(log, SCREENSHOTS / "dev.log")


def _wait_until_loaded(server: DevServer) -> None:
    """Until the webserver answers and the code location is loaded (a load error fails with its message)."""
    query = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            entries = server.graphql(query)["workspaceOrError"]["locationEntries"]
        except OSError:
            entries = []
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            loaded = [entry["locationOrLoadError"] for entry in entries]
            assert all(location["__typename"] == "RepositoryLocation" for location in loaded), loaded
            return
        time.sleep(1)
    pytest.fail(f"the dev server did not load the code location in {START_TIMEOUT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, dev_server):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    context.close()


def _open(page, server: DevServer, path: str) -> None:
    page.goto(server.url + path)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")  # "Join the Dagster community", on a fresh instance
    try:
        skip.wait_for(state="visible", timeout=3000)
        skip.click()
    except sync_api.TimeoutError:
        pass


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


PARTITION_STATS = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
    partitionStats { numMaterialized numPartitions numFailed numMaterializing } } } }"""


@dataclass
class Backfill:
    before: str  # the asset's overview before any run
    seconds: float  # from the click on "Launch backfill" to every partition materialized


@pytest.fixture(scope="module")
def backfill(page, dev_server) -> Backfill:
    """What a user does after `make dev`: look at the asset, then "Materialize all…" on the group's lineage,
    every partition, "Launch backfill"; and wait until every shard is materialized."""
    _open(page, dev_server, f"/assets/{ASSET}")
    page.get_by_text("Never materialized", exact=True).wait_for()
    page.get_by_text("Definition", exact=True).wait_for()  # the overview's last section
    before = page.inner_text("body")
    _shot(page, "01-asset-before-any-run")

    _open(page, dev_server, "/locations/normals_pipeline/asset-groups/normals")
    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="All", exact=True).click()
    dialog.get_by_text(f"{SHARDS} partitions", exact=True).wait_for()
    _shot(page, "02-materialize-all-dialog")
    dialog.get_by_role("button", name="Launch backfill").click()
    dialog.wait_for(state="hidden")
    started = time.monotonic()

    deadline = started + BACKFILL_TIMEOUT_S
    while True:
        dev_server.check_alive()
        stats = {  # the training pairs are built in the same runs, right after each run's maps
            asset: dev_server.graphql(PARTITION_STATS, {"key": {"path": [asset]}})["assetNodeOrError"]["partitionStats"]
            for asset in (ASSET, "training_pairs")
        }
        if any(counts["numFailed"] for counts in stats.values()):
            _shot(page, "99-failed")
            pytest.fail(f"partitions failed: {stats}\n{dev_server.log_tail()}")
        if all(counts["numMaterialized"] == SHARDS for counts in stats.values()):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{stats} after {BACKFILL_TIMEOUT_S} s:\n{dev_server.log_tail()}")
        time.sleep(2)
    return Backfill(before, time.monotonic() - started)


def _richest_partition(output: Path) -> tuple[str, int]:
    """The shard with the most images (its preview has the most to show), from the manifests on disk."""
    storage = LocalStorage(output)
    counts = {key: len(read_manifest(storage, key)) for key in manifest_keys(storage)}
    key = max(counts, key=counts.get)
    return key, counts[key]


ANSI = re.compile(r"\x1b\[[0-9;]*m")
METADATA_NAMES = [
    "images",
    "enriched",
    "errors",
    "errors_by_code",
    "processed_this_run",
    "requests",
    "retries_by_code",
    "http_429",
    "credits_consumed",
    "images_per_second",
    "manifest",
    "preview",
    "dagster/row_count",
    "remaining_credits",
]
MATERIALIZATIONS = """query($key: AssetKeyInput!, $partitions: [String!]) { assetNodeOrError(assetKey: $key) {
    ... on AssetNode { assetMaterializations(partitions: $partitions) { partition metadataEntries { label
    ... on IntMetadataEntry { intValue } ... on MarkdownMetadataEntry { mdStr } } } } } }"""


def _partition_keys() -> list[str]:
    return [f"{shard:02d}" for shard in range(SHARDS)]


def _value_after(body: str, label: str) -> str:
    """The text shown next to a metadata label (the UI renders label and value as table cells)."""
    lines = [line.strip() for line in body.splitlines()]
    values = [line for line in lines[lines.index(label) + 1 :] if line]
    return values[0]


def test_the_dev_server_logs_no_warning(dev_server, backfill):
    """`make dev`'s command, through a whole backfill: neither `dagster dev`'s "superseded by dg dev" nor
    "a dagster.yaml in the current folder is not used", nor any other warning (Beta/Preview included)."""
    lines = ANSI.sub("", dev_server.log.read_text(errors="replace")).splitlines()
    warned = sorted({line for line in lines if WARNING.search(line)})
    assert not warned, "\n".join(warned)


def test_the_column_schema_shows_before_any_run(backfill):
    assert "\nColumns\n" in backfill.before, "no column schema on the asset's overview before any run"
    columns = backfill.before.split("\nColumns\n", 1)[1]
    for name in COLUMNS:
        assert f"\n{name}\n" in columns, name
    assert "SHA-256 of the file's bytes (null if it could not be read)." in columns  # a description
    assert "non-nullable" in columns and "unique" in columns  # constraints, from the pandera schema


def test_materialize_all_materializes_every_partition(page, dev_server, backfill):
    _open(page, dev_server, f"/assets/{ASSET}?view=partitions")
    page.get_by_text(f"Materialized ({SHARDS})", exact=True).wait_for()
    body = page.inner_text("body")
    assert "Missing (0)" in body and "Failed (0)" in body and "Materializing (0)" in body
    _shot(page, "03-partitions-16-of-16")

    _open(page, dev_server, "/locations/normals_pipeline/asset-groups/normals")
    for asset in (ASSET, "training_pairs"):  # both partitioned assets of the group, built in the same runs
        page.locator(f'a[href="/assets/{asset}?view=partitions"]', has_text="100% filled").wait_for()
    _shot(page, "04-lineage-after-backfill")

    _open(page, dev_server, "/runs?view=backfills")
    page.get_by_text("Success", exact=True).first.wait_for()  # the one backfill, launched above
    body = page.inner_text("body")
    assert f"{SHARDS} partitions" in body and "Manually launched" in body
    _shot(page, "05-backfill-succeeded")


def test_every_partition_has_its_own_metadata_and_preview(dev_server, backfill):
    variables = {"key": {"path": [ASSET]}, "partitions": _partition_keys()}
    events = dev_server.graphql(MATERIALIZATIONS, variables)["assetNodeOrError"]["assetMaterializations"]
    latest = {}
    for event in events:  # newest first
        latest.setdefault(event["partition"], event)
    assert sorted(latest) == _partition_keys()
    storage = LocalStorage(dev_server.output)
    for key, event in latest.items():
        entries = {entry["label"]: entry for entry in event["metadataEntries"]}
        assert set(METADATA_NAMES) - {"remaining_credits"} <= set(entries), (key, sorted(entries))
        rows = len(read_manifest(storage, key))
        assert entries["images"]["intValue"] == rows, key
        images = entries["preview"]["mdStr"].count("](data:image/jpeg;base64,")
        assert images == 2 * min(rows, 4), (key, rows, entries["preview"]["mdStr"][:200])


def test_a_partition_page_shows_the_metadata_and_the_preview_renders_images(page, dev_server, backfill):
    key, rows = _richest_partition(dev_server.output)
    _open(page, dev_server, f"/assets/{ASSET}?view=partitions&partition={key}")
    page.get_by_text("images_per_second", exact=True).wait_for()
    body = page.inner_text("body")
    lines = {line.strip() for line in body.splitlines()}
    assert set(METADATA_NAMES) <= lines, sorted(set(METADATA_NAMES) - lines)
    assert _value_after(body, "images") == str(rows)
    assert _value_after(body, "enriched") == str(rows)  # synthetic portraits: every one enriched
    _shot(page, f"06-partition-{key}-metadata")

    preview = page.locator("tr", has_text="preview").last
    assert "[Show Markdown]" in preview.inner_text(), f"the preview is not the visual one: {preview.inner_text()}"
    preview.get_by_text("[Show Markdown]").click()  # Markdown over 1000 characters opens in a dialog
    dialog = page.get_by_role("dialog")
    thumbnails = dialog.locator("img[src^='data:image/jpeg;base64,']")
    thumbnails.first.wait_for()
    shown = min(rows, 4)
    assert thumbnails.count() == 2 * shown  # each image next to its normal map
    for index in range(thumbnails.count()):
        width, height = thumbnails.nth(index).evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert 0 < width <= 96 and height == 96  # decoded by the browser: the picture is there
    text = dialog.inner_text()
    assert "normal map" in text and "credit" in text
    assert rows <= 4 or f"{shown} of {rows} rows" in text
    _shot(page, f"07-partition-{key}-preview")


def test_the_manifest_check_has_a_passed_result_per_partition(page, dev_server, backfill):
    _open(page, dev_server, f"/assets/{ASSET}?view=checks")
    page.get_by_role("tab", name="Execution history").click()
    table = page.locator("table", has_text="Evaluation result")
    table.locator("tbody tr").first.wait_for()
    headers = [cell.strip() for cell in table.locator("thead th").all_inner_texts()]
    result_at, partition_at = headers.index("Evaluation result"), headers.index("Partition")
    results = {}
    for row in table.locator("tbody tr").all():
        cells = [cell.strip() for cell in row.locator("td").all_inner_texts()]
        results.setdefault(cells[partition_at], cells[result_at])  # newest first
    _shot(page, "08-check-execution-history")
    assert {key: results.get(key) for key in _partition_keys()} == {key: "Passed" for key in _partition_keys()}

    page.get_by_role("tab", name="Partitions").last.click()  # the check's own partitions tab
    page.get_by_text(f"Passed ({SHARDS})", exact=True).wait_for(timeout=15_000)
    _shot(page, "09-check-partitions")
