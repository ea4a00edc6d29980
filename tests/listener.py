"""A test's own RabbitMQ queue on the event exchange, collecting what the services publish."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika

from shared.messaging import declare_topology
from shared.settings import CommonSettings


class EventLog:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def of(self, event_type: str, havip_id: uuid.UUID | str | None = None) -> list[dict[str, Any]]:
        """Data of the events of one type, optionally of one HAVIP, in arrival order."""
        return [
            e["data"]
            for e in self.received
            if e["type"] == event_type and (havip_id is None or e["data"].get("havip_id") == str(havip_id))
        ]


@asynccontextmanager
async def listening(settings: CommonSettings, routing_keys: Iterable[str]) -> AsyncIterator[EventLog]:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, settings)
        queue = await channel.declare_queue(exclusive=True)  # gone with the connection
        for key in routing_keys:
            await queue.bind(exchange, key)
        log = EventLog()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            log.received.append(json.loads(message.body))
            await message.ack()

        await queue.consume(on_message)
        yield log
    finally:
        await connection.close()
