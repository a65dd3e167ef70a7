"""moto's S3 server on loopback, with fake credentials that cannot reach real AWS."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from uuid import uuid4

import boto3
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

__all__ = ["s3_endpoint", "s3_client", "s3_bucket", "s3_requests", "s3_expects"]


class _Counting:
    """moto's WSGI app, noting each request it serves as `(method, path)`, the path `/bucket/key` (boto3
    addresses a loopback IP path-style)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []
        self.expects: list[tuple[str, str | None]] = []  # each request's `Expect` header, by path

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")  # WSGI's str is latin-1
        self.seen.append((environ["REQUEST_METHOD"], path))
        self.expects.append((path, environ.get("HTTP_EXPECT")))
        return self.app(environ, start_response)


_APP = _Counting(DomainDispatcherApplication(create_backend_app))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1; AWS_ENDPOINT_URL points at it too."""
    server = make_server("127.0.0.1", 0, _APP, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.shutdown()
            thread.join()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    name = f"b-{uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_requests(s3_endpoint: str) -> list[tuple[str, str]]:
    """The requests the server serves from now on, as `(method, "/bucket/key")`, in order."""
    _APP.seen.clear()
    return _APP.seen


@pytest.fixture
def s3_expects(s3_endpoint: str) -> list[tuple[str, str | None]]:
    """The `Expect` header of each request the server serves from now on, as `("/bucket/key", value)`."""
    _APP.expects.clear()
    return _APP.expects
