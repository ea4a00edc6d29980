"""What `python -m services.<name> migrate` does for a service that consumes events: its database (created if
missing), its schema's migrations (as its database role), and its queue with its bindings — declared before the
service first runs, so that no event published before then is lost."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from shared.db import ensure_database
from shared.messaging import Broker, declare_consumer_queue
from shared.migrations import apply_migrations
from shared.settings import CommonSettings

log = logging.getLogger(__name__)


async def migrate_service(
    settings: CommonSettings,
    *,
    source: str,
    schema: str,
    migrations: Path,
    queue: str,
    subscriptions: Iterable[str],
    single_active: bool = False,
) -> list[str]:
    """Returns the migrations applied now. `single_active`: the queue's kind (declare_consumer_queue)."""
    if await ensure_database(settings.database_url):
        log.info("created the database")
    applied = await apply_migrations(settings.database_url, schema, migrations, settings.database_role)
    log.info("migrations applied", extra={"applied": applied})
    broker = Broker(settings, f"{source}-migrate")
    await broker.connect()
    try:
        channel = await broker.connection.channel()
        await declare_consumer_queue(channel, settings, queue, subscriptions, single_active=single_active)
    finally:
        await broker.close()
    return applied
