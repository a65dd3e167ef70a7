"""The code location Dagster loads (`dagster dev -w workspace.yaml`).

Configured from the environment: NORMALS_DATASET and NORMALS_OUTPUT (folders or s3:// URIs),
NORMALS_SHARDS (default 16), NORMALS_SHARDS_PER_RUN (shards a backfill puts in one run, default 16),
CLIPDROP_API_KEY, CLIPDROP_API_URL (default: the real API), CLIPDROP_RPM (default 60), NORMALS_REDIS_URL
(share the key's rate and credits across hosts; default: across this host's processes). S3 uses the
standard AWS variables (AWS_ENDPOINT_URL, ...).
"""

from normals_pipeline.orchestration import normals_definitions_from_env

defs = normals_definitions_from_env()
