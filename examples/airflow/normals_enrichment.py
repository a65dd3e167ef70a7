"""The example DAG `normals_enrichment`, configured like `definitions.py`: NORMALS_DATASET, NORMALS_OUTPUT,
NORMALS_SHARDS, and the key from the connection `clipdrop_default` or CLIPDROP_API_KEY / CLIPDROP_API_URL /
CLIPDROP_RPM. Point AIRFLOW__CORE__DAGS_FOLDER at this folder, then `airflow dags test normals_enrichment`."""

from normals_pipeline.airflow import normals_dag_from_env

dag = normals_dag_from_env("normals_enrichment")
