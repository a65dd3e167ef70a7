"""The thin Dagster layer: resources, partitions, assets, checks, sensors and schedules over the core."""

from .definitions import build_definitions
from .factory import merge_normals_definitions, normals_definitions, normals_definitions_from_env
from .resources import ClipdropResource, DatasetResource, S3Settings

__all__ = [
    "ClipdropResource",
    "DatasetResource",
    "S3Settings",
    "build_definitions",
    "merge_normals_definitions",
    "normals_definitions",
    "normals_definitions_from_env",
]
