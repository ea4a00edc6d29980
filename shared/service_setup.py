"""What `python -m services.<name> migrate` does for a service that consumes events: its database (created if
missing), its schema's migrations (as its database role), and its queue with its bindings — declared before the
service first runs, so that no event published before then is lost."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection

from shared.db import ensure_database
from shared.messaging import (
    Broker,
    QueueArgumentsDiffer,
    QueueSpec,
    close_quietly,
    cluster_connection,
    declare_consumer_queue,
    declare_topology,
)
from shared.migrations import apply_migrations
from shared.settings import CommonSettings

T = TypeVar("T")

log = logging.getLogger(__name__)


async def migrate_service(
    settings: CommonSettings,
    *,
    source: str,
    schema: str,
    migrations: Path,
    queues: Sequence[QueueSpec],
    retired: Sequence[str] = (),
) -> list[str]:
    """Returns the migrations applied now. `queues`: the service's queues, declared (an older deployment's queue
    of the same name with other arguments is replaced while it is empty and unused); `retired`: queues an older
    version consumed and this one does not, deleted while they are empty and unused (else said, and kept)."""
    if await ensure_database(settings.database_url):
        log.info("created the database")
    applied = await _once_the_database_is_there(
        lambda: apply_migrations(settings.database_url, schema, migrations, settings.database_role)
    )
    log.info("migrations applied", extra={"applied": applied})
    await _replace_differing_dead_letter_queue(settings, f"{source}-migrate")
    broker = Broker(settings, f"{source}-migrate")
    await broker.connect()
    try:
        await declare_queues(broker, settings, queues)
        for name in retired:
            await delete_unused_empty_queue(broker.connection, settings.queue(name), replaced=False)
    finally:
        await broker.close()
    return applied


# How long a database just created may stay out of sight of a standby listed first in a multi-host URL.
DATABASE_VISIBLE_WITHIN_S = 30.0


async def _once_the_database_is_there(attempt: Callable[[], Awaitable[T]]) -> T:
    """A multi-host URL's first host may be a standby that has not replayed the CREATE DATABASE yet: the driver
    stops at its "does not exist" (a refusal of the database, not of the host) instead of trying the next host,
    the primary. Tried again until the standby has it (bounded)."""
    deadline = time.monotonic() + DATABASE_VISIBLE_WITHIN_S
    while True:
        try:
            return await attempt()
        except asyncpg.InvalidCatalogNameError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def declare_queues(broker: Broker, settings: CommonSettings, queues: Sequence[QueueSpec]) -> None:
    """Declare each queue (idempotent); one an older deployment declared with other arguments is replaced while
    it is empty and unused, else QueueArgumentsDiffer."""
    for spec in queues:
        await _declare(broker, settings, spec)


async def _declare(broker: Broker, settings: CommonSettings, spec: QueueSpec) -> None:
    async def declare_on(channel: AbstractChannel) -> None:
        await declare_consumer_queue(
            channel,
            settings,
            spec.name,
            spec.routing_keys,
            single_active=spec.single_active,
            arguments=spec.arguments,
        )

    channel = await broker.connection.channel()
    try:
        await declare_on(channel)
    except QueueArgumentsDiffer:
        # The refused declaration closed the channel; the replacement works on a channel of its own.
        await close_quietly(channel)
        if not await delete_unused_empty_queue(broker.connection, settings.queue(spec.name)):
            raise
        channel = await broker.connection.channel()
        await declare_on(channel)
    finally:
        # Whatever its state: a robust channel the broker closed (a refused right) would reopen by itself.
        await close_quietly(channel)


async def _replace_differing_dead_letter_queue(settings: CommonSettings, source: str) -> None:
    """The dead-letter queue is declared by every process as it connects: one of another kind (a classic queue
    where quorum queues are configured now) would stop the connection itself, so it is replaced first, while it
    is empty and unused."""
    connection = cluster_connection(settings, source)
    try:
        # Closed here even if it never connects: left to the collector, its close() may find no loop to run on
        # ("coroutine 'RobustConnection.close' was never awaited").
        await connection.connect()
        channel = await connection.channel()
        try:
            await declare_topology(channel, settings)  # BrokerAccessRefused, in words, for a user that may not
        except QueueArgumentsDiffer:
            if not await delete_unused_empty_queue(connection, settings.dead_letter_queue):
                raise
        finally:
            await close_quietly(channel)
    finally:
        await connection.close()


async def delete_unused_empty_queue(connection: AbstractConnection, name: str, *, replaced: bool = True) -> bool:
    """Delete the queue `name` if nothing consumes it and it holds no message, so that it can be declared anew
    with this version's arguments (an older deployment's classic queue); False, and nothing deleted, otherwise.
    RabbitMQ checks both conditions as it deletes: a message or a consumer arriving meanwhile keeps the queue."""
    channel = await connection.channel()
    try:
        try:
            existing = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return True  # nothing to delete
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
        await close_quietly(channel)
    if replaced:
        log.warning("replaced queue %s, empty and unused, by one with this version's arguments", name)
    else:
        log.warning("deleted queue %s, empty and unused: this version no longer consumes it", name)
    return True
