"""The cluster's code location: the project's factory on the environment, with Dagster's Celery executor.

Every step of a run goes through the broker to a Celery worker (`dagster-celery worker start`, one per host),
so the shard runs of a backfill land on several hosts. The settings are those of the repository's
`definitions.py`, read the same way (`normals_definitions_from_env`: NORMALS_DATASET, NORMALS_OUTPUT,
NORMALS_SHARDS, NORMALS_SHARDS_PER_RUN, CLIPDROP_API_KEY, CLIPDROP_API_URL, CLIPDROP_RPM, NORMALS_REDIS_URL);
the executor's are in `celery.yaml` (or the file NORMALS_CELERY_CONFIG names), the same file the workers
read. Workers load this file too: every host needs the same variables, its own NORMALS_STATE_DIR, and the
same NORMALS_REDIS_URL (one rate and one set of claims for the key across hosts).
"""

import os
from pathlib import Path

import yaml
from dagster import Definitions
from dagster_celery import celery_executor

from normals_pipeline.orchestration import normals_definitions_from_env

CELERY_CONFIG = Path(os.environ.get("NORMALS_CELERY_CONFIG") or Path(__file__).with_name("celery.yaml"))

defs = Definitions.merge(
    normals_definitions_from_env(),
    Definitions(executor=celery_executor.configured(yaml.safe_load(CELERY_CONFIG.read_text())["execution"]["config"])),
)
