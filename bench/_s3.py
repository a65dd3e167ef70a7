"""moto's S3 server in its own process, counting the requests it serves.

    python -m bench._s3 [--port 0] [--latency SECONDS]

Prints the endpoint URL first, serves until SIGINT or SIGTERM. `GET /_bench/counts` answers the requests served
since the last `POST /_bench/reset`, by `"<verb> <folder>"`: the verb is the HTTP method, or LIST for a listing;
the folder is the key's first two parts below the bucket (`output/normals`, `dataset/img-1.jpg` → `dataset`).
Its own process: moto's CPU is not the bench's, nor shares the measured run's GIL. `--latency` holds each request
that long before moto serves it (each on its own thread), as a remote S3 would: moto on loopback answers at once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

COUNTS_PATH = "/_bench/counts"
RESET_PATH = "/_bench/reset"


class CountingApp:
    """moto's WSGI app behind a counter of what each request asked for."""

    def __init__(self, app: Callable[..., Iterable[bytes]], latency: float = 0.0) -> None:
        self.app = app
        self.latency = latency
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in (COUNTS_PATH, RESET_PATH):
            with self._lock:
                body = json.dumps(dict(self.counts)).encode()
                if path == RESET_PATH:
                    self.counts.clear()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        with self._lock:
            self.counts[_kind(environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""))] += 1
        time.sleep(self.latency)
        return self.app(environ, start_response)


def _kind(method: str, path: str, query: str) -> str:
    """`"<verb> <folder>"` of one request (path-style addressing: `/<bucket>/<key>`)."""
    bucket, _, key = path.lstrip("/").partition("/")
    params = urllib.parse.parse_qs(query)
    if method == "GET" and not key and "prefix" in params:
        return f"LIST {'/'.join(params['prefix'][0].split('/')[:2])}"
    if not key:
        return f"{method} (bucket)"
    parts = key.split("/")
    return f"{method} {'/'.join(parts[:2]) if len(parts) > 2 else parts[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._s3", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request waits before it is served")
    args = parser.parse_args(argv)
    server = make_server(
        "127.0.0.1",
        args.port,
        CountingApp(DomainDispatcherApplication(create_backend_app), args.latency),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.server_address[:2]
    print(f"http://{host}:{port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
