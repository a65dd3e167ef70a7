"""An S3 stand-in in its own process, counting the requests it serves.

    python -m bench._s3 [--port 0] [--latency SECONDS] [--moto]

Prints the endpoint URL first, serves until SIGINT or SIGTERM. `GET /_bench/counts` answers the requests served
since the last `POST /_bench/reset`, by `"<verb> <folder>"`: the verb is the HTTP method, or LIST for a listing;
the folder is the key's first two parts below the bucket (`output/normals`, `dataset/img-1.jpg` → `dataset`).
Its own process: the stand-in's CPU is not the bench's, nor shares the measured run's GIL. `--latency` holds each
request that long before it is served (the waits overlap), as a remote S3 would: on loopback it answers at once.

The stand-in is `MemoryS3` (`bench/_memory_s3.py`), which answers from memory; `--moto` serves moto instead, as the
figures did until 2026-12-06, where moto's CPU bounded them. Either way uvicorn serves it and keeps connections
open as S3 does (moto's own server, werkzeug's, closes every connection after one request: each request would
cost both sides a new connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from ._memory_s3 import MemoryS3

COUNTS_PATH = "/_bench/counts"
RESET_PATH = "/_bench/reset"
MOTO_THREADS = 256  # moto's requests served at once: more than a run makes (64 in flight, 32 plan readers, ...)

Asgi = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Counting:
    """An ASGI app in front of another, counting what each request asked for and holding it `latency` first."""

    def __init__(self, app: Asgi, latency: float = 0.0) -> None:
        self.app = app
        self.latency = latency
        self.counts: Counter[str] = Counter()

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        path = scope["path"]
        if path in (COUNTS_PATH, RESET_PATH):
            body = json.dumps(dict(self.counts)).encode()
            if path == RESET_PATH:
                self.counts.clear()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.counts[_kind(scope["method"], path, scope["query_string"].decode())] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        await self.app(scope, receive, send)


def _moto() -> Asgi:
    from a2wsgi import WSGIMiddleware
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return WSGIMiddleware(DomainDispatcherApplication(create_backend_app), workers=MOTO_THREADS)


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
    parser.add_argument("--moto", action="store_true", help="serve moto, not the in-memory stand-in")
    args = parser.parse_args(argv)
    app = Counting(_moto() if args.moto else MemoryS3(), args.latency)
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    host, port = listener.getsockname()[:2]
    print(f"http://{host}:{port}", flush=True)
    # uvicorn stops on SIGINT or SIGTERM by itself
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
