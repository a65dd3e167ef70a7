"""What the output's lease (`normals_pipeline.ownership`) adds to a run's start, on a local folder and on S3
(moto's server on loopback: requests, not S3's latency): `.venv/bin/python -m bench.owner_lease`.

A first run lists `owner/` and creates the lease (2 requests on S3); a later run, or another process of the same
state, lists, reads and rewrites it (3). `normals-pipeline run` takes it twice (the command, then the run joins).
Prints the median and the worst of 50 takes each. Not one of `python -m bench`'s figures: it has no target.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from normals_pipeline import ownership
from normals_pipeline._state import SQLiteClaims
from normals_pipeline.storage import LocalStorage, S3Storage, Storage

TAKES = 50


def take_ms(make_output: Callable[[], Storage], store: SQLiteClaims, first: bool) -> list[float]:
    times = []
    for _ in range(TAKES):
        output = make_output()
        if not first:
            ownership.take(output, store).close()
        start = time.perf_counter()
        lease = ownership.take(output, store)
        times.append((time.perf_counter() - start) * 1000)
        lease.close()
    return times


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="owner-lease-"))
    store = SQLiteClaims(work / "state")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="bench")
    outputs: dict[str, Callable[[], Storage]] = {
        "local": lambda: LocalStorage(work / uuid.uuid4().hex),
        "s3 (moto, loopback)": lambda: S3Storage("bench", uuid.uuid4().hex, client),
    }
    try:
        for name, make_output in outputs.items():
            for first in (True, False):
                times = take_ms(make_output, store, first)
                kind = "first run (create)" if first else "later run (join)"
                print(f"{name:20s} {kind:19s} median {statistics.median(times):6.2f} ms, max {max(times):6.2f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
