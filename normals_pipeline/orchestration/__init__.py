"""The thin Dagster layer: resources, partitions, assets, checks, sensors and schedules over the core."""

from .definitions import build_definitions
from .factory import normals_definitions, normals_definitions_from_env
from .resources import ClipdropResource, DatasetResource

__all__ = [
    "ClipdropResource",
    "DatasetResource",
    "build_definitions",
    "normals_definitions",
    "normals_definitions_from_env",
]
