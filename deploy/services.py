"""Check the services the cluster needs before anything starts, and create its database if missing.

    python deploy/services.py

Reads DAGSTER_PG_URL, NORMALS_REDIS_URL and the broker of celery.yaml (NORMALS_CELERY_CONFIG); exits 2 with one
line per missing service, so `make cluster-up` fails with what to start instead of a worker's stack trace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url


def _postgres(url: str) -> None:
    """Connect to the server's `postgres` database and create the instance's database if it is missing."""
    import psycopg2
    from psycopg2 import sql

    target = make_url(url)
    admin = target.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    connection = psycopg2.connect(admin, connect_timeout=5)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.database)))
    finally:
        connection.close()


def _redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_connect_timeout=5).ping()


def _broker(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)


def main() -> int:
    celery_config = Path(os.environ.get("NORMALS_CELERY_CONFIG") or Path(__file__).with_name("celery.yaml"))
    broker = yaml.safe_load(celery_config.read_text())["execution"]["config"]["broker"]
    checks = [
        ("PostgreSQL (DAGSTER_PG_URL)", _postgres, os.environ.get("DAGSTER_PG_URL")),
        ("Redis (NORMALS_REDIS_URL)", _redis, os.environ.get("NORMALS_REDIS_URL")),
        (f"the Celery broker ({celery_config.name})", _broker, broker if isinstance(broker, str) else None),
    ]
    missing = []
    for name, check, url in checks:
        if not url:
            missing.append(f"{name}: not set")
            continue
        try:
            check(url)
        except Exception as error:  # any failure to reach it: say which service and why, in one line
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            where = make_url(url)
            missing.append(f"{name} at {where.host}:{where.port or 'default port'}: {reason}")
    for line in missing:
        print(f"cluster: cannot use {line}", file=sys.stderr)
    return 2 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
