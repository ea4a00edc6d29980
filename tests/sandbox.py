"""A database and a RabbitMQ virtual host that exist only for one test run or one demo, then are dropped."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from shared.db import drop_database, ensure_database
from shared.migrations import apply_migrations

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = {
    "allocator": ROOT / "services" / "allocator" / "migrations",
    "binding": ROOT / "services" / "binding" / "migrations",
}


@asynccontextmanager
async def temporary_database(base: str, name: str) -> AsyncIterator[str]:
    """A new database with both services' migrations applied; dropped on exit."""
    dsn = f"{base}/{name}"
    await ensure_database(dsn)
    try:
        for schema, directory in MIGRATIONS.items():
            await apply_migrations(dsn, schema, directory)
        yield dsn
    finally:
        await drop_database(dsn)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def temporary_vhost(base: str, vhost: str, user: str = "guest") -> Iterator[str]:
    """A RabbitMQ virtual host: every exchange and queue made in it goes with it on exit."""
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{base}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)
