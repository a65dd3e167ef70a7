"""The pipeline as an Airflow provider, over the same core and guards as the Dagster layer: `ClipdropHook`
(connection -> settings -> guarded client), one operator per task, and the DAG factory `normals_dag`.

    from normals_pipeline.airflow import normals_dag
    dag = normals_dag("normals_enrichment", dataset="s3://bucket/images", output="s3://bucket/enriched")
"""

from .dag import normals_dag, normals_dag_from_env, pool_for
from .hooks import ClipdropHook
from .operators import (
    NormalsEnrichOperator,
    NormalsInventoryOperator,
    NormalsTrainingPairsOperator,
    NormalsValidateOperator,
)

__all__ = [
    "ClipdropHook",
    "NormalsEnrichOperator",
    "NormalsInventoryOperator",
    "NormalsTrainingPairsOperator",
    "NormalsValidateOperator",
    "normals_dag",
    "normals_dag_from_env",
    "pool_for",
]
