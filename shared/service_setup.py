"""What `python -m services.<name> migrate` does for a service that consumes events: its database (created if
missing), its schema's migrations (as its database role), and its queue with its bindings — declared before the
service first runs, so that no event published before then is lost."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import aiormq

from shared.db import ensure_database
from shared.messaging import Broker, QueueArgumentsDiffer, declare_consumer_queue
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
        try:
            await declare_consumer_queue(channel, settings, queue, subscriptions, single_active=single_active)
        except QueueArgumentsDiffer:
            # The refused declaration closed the channel; the replacement works on a channel of its own.
            if not await replace_unused_empty_queue(broker, settings.queue(queue)):
                raise
            channel = await broker.connection.channel()
            await declare_consumer_queue(channel, settings, queue, subscriptions, single_active=single_active)
    finally:
        await broker.close()
    return applied


async def replace_unused_empty_queue(broker: Broker, name: str) -> bool:
    """Delete the queue `name` if nothing consumes it and it holds no message, so that it can be declared anew
    with this version's arguments (an older deployment's classic queue); False, and nothing deleted, otherwise.
    RabbitMQ checks both conditions as it deletes: a message or a consumer arriving meanwhile keeps the queue."""
    channel = await broker.connection.channel()
    try:
        existing = await channel.declare_queue(name, passive=True)
        result = existing.declaration_result
        if result.message_count or result.consumer_count:
            log.error(
                "queue %s holds %d messages and has %d consumers: not replaced (let the processes of the older "
                "version drain it, stop them, and migrate again)",
                name,
                result.message_count,
                result.consumer_count,
            )
            return False
        await existing.delete(if_unused=True, if_empty=True)
    except aiormq.exceptions.AMQPError as exc:
        log.error("queue %s could not be replaced: %s", name, exc)
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    log.warning("replaced queue %s, empty and unused, by one with this version's arguments", name)
    return True
