"""Fixtures for the services this machine kind runs (Redis, PostgreSQL, RabbitMQ): skip without them, unless
REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

__all__ = ["amqp_url", "postgres_url", "redis_server", "redis_url"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    if host not in _LOOPBACK:
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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on NORMALS_TEST_POSTGRES_URL's server, as a `postgresql+psycopg2://` URL (SQLAlchemy 2.1's
    plain `postgresql://` wants psycopg 3); dropped afterwards, so concurrent runs and leftovers never meet."""
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    url = os.environ.get("NORMALS_TEST_POSTGRES_URL")
    if not url:
        _unavailable("PostgreSQL", "NORMALS_TEST_POSTGRES_URL is not set")
    server = make_url(url)
    if server.host not in _LOOPBACK:
        pytest.fail(f"tests only talk to loopback, not {server.host}")
    name = f"normals_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    except psycopg2.Error as error:
        _unavailable("PostgreSQL", str(error).strip())
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture
def amqp_url() -> str:
    """NORMALS_TEST_AMQP_URL (a RabbitMQ broker for Celery, e.g. pyamqp://guest:guest@127.0.0.1:5672//), checked
    by connecting. Tests name their own queues, so nothing is left to clean up but those."""
    from kombu import Connection
    from sqlalchemy.engine import make_url

    url = os.environ.get("NORMALS_TEST_AMQP_URL")
    if not url:
        _unavailable("RabbitMQ", "NORMALS_TEST_AMQP_URL is not set")
    if make_url(url).host not in _LOOPBACK:
        pytest.fail(f"tests only talk to loopback, not {make_url(url).host}")
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:  # kombu raises the transport's own errors
        _unavailable("RabbitMQ", str(error).strip() or type(error).__name__)
    return url


def unique_key() -> str:
    return f"test-key-{uuid.uuid4().hex}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def redis_server() -> Iterator[Callable[[], tuple[str, subprocess.Popen]]]:
    """Start throwaway `redis-server`s on loopback (no persistence), each its URL and process: a test may kill
    one, or delete its keys, without touching anyone else's state; `port` restarts one where it was (empty).
    Killed at teardown."""
    import redis

    if shutil.which("redis-server") is None:
        _unavailable("redis-server", "not installed")
    started: list[subprocess.Popen] = []

    def start(port: int | None = None) -> tuple[str, subprocess.Popen]:
        port = port or _free_port()
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(server)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                return url, server
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    yield start
    for server in started:
        server.kill()
        server.wait()
