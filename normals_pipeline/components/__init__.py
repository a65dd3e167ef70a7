"""Dagster Components (`dg`) over the pipeline: `SurfaceNormalsComponent`.

Registered under the `dagster_dg_cli.registry_modules` entry point as the module `normals_pipeline`, so a `dg`
project lists it as `normals_pipeline.SurfaceNormalsComponent`; it is also importable from here.
"""

from .surface_normals.component import SurfaceNormalsComponent

__all__ = ["SurfaceNormalsComponent"]
