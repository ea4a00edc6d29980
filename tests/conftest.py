"""Session fixtures: a database and a RabbitMQ virtual host created for this test run, dropped after it.

Tests never touch what they did not create: everything lives in `havip_test_<hex>` (Postgres) and the
vhost `havip-test-<hex>` (RabbitMQ), both removed at the end even when tests fail.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.db import drop_database, ensure_database
from shared.migrations import apply_migrations

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = {
    "allocator": ROOT / "services" / "allocator" / "migrations",
    "binding": ROOT / "services" / "binding" / "migrations",
}
PG_BASE = os.environ.get("HAVIP_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_BASE = os.environ.get("HAVIP_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
RUN_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    dsn = f"{PG_BASE}/havip_test_{RUN_ID}"
    await ensure_database(dsn)
    try:
        for schema, directory in MIGRATIONS.items():
            await apply_migrations(dsn, schema, directory)
        yield dsn
    finally:
        await drop_database(dsn)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    vhost = f"havip-test-{RUN_ID}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_BASE}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)
