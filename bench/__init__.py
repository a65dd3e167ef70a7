"""The benchmark suite of normals_pipeline: `make bench` or `python -m bench` (see bench/README.md)."""
