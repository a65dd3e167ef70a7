"""Fixtures for the services this machine kind runs (Redis): skip without them, unless REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["redis_url"]


def _unavailable(what: str, why: str) -> None:
    message = f"{what} is not available ({why})"
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}, and REQUIRE_SERVICES=1")
    pytest.skip(message)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """NORMALS_TEST_REDIS_URL, checked with a PING; keys the test wrote are deleted afterwards."""
    import redis

    url = os.environ.get("NORMALS_TEST_REDIS_URL")
    if not url:
        _unavailable("Redis", "NORMALS_TEST_REDIS_URL is not set")
    host = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("host", "")
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.fail(f"tests only talk to loopback, not {host}")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as error:
        _unavailable("Redis", str(error))
    before = set(client.keys("normals:*"))
    yield url
    new = set(client.keys("normals:*")) - before
    if new:
        client.delete(*new)
    client.close()


def unique_key() -> str:
    return f"test-key-{uuid.uuid4().hex}"
