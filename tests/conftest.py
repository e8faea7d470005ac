"""Shared fixtures: local services on 127.0.0.1 and temporary data directories.

A test that needs PostgreSQL or NATS skips with the reason when the service is absent,
except under CI=true, where absence is a failure (.ci/run starts the services first).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_HOST, PG_PORT = "127.0.0.1", 5432
NATS_HOST, NATS_PORT = "127.0.0.1", 4222


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: services are required; .ci/run should start it)")
    pytest.skip(f"{message}; start it to run this test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """DSN of the local `test` database (trust auth)."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    return os.environ.get("PAYPOST_TEST_PG", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test")


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL schema prefix for one test, dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (name + "%",)
        ).fetchall()
        for (nsp,) in rows:
            conn.execute(f'DROP SCHEMA IF EXISTS "{nsp}" CASCADE')


@pytest.fixture(scope="session")
def nats_url() -> str:
    require_service("NATS JetStream", NATS_HOST, NATS_PORT)
    return f"nats://{NATS_HOST}:{NATS_PORT}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "paypost-data"
    d.mkdir()
    return d
