"""A test's own RabbitMQ queue on the event exchange, recording every event published there with the routing keys
it is bound to."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from shared.events import Envelope, decode
from shared.messaging import Broker, Delivery, declare_topology
from shared.settings import CommonSettings
from tests.waiting import eventually

EVENT_TIMEOUT_S = 5.0


def about(env: Envelope) -> str | None:
    """The resource an event is about: its `id`, or the HAVIP's of the events that carry no `id`."""
    resource: str | None = env.data.get("id", env.data.get("havip_id"))
    return resource


class EventLog:
    """The events received, in arrival order, each validated against its data's model."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            decode(message.body)  # validates the data against its model
            self.received.append(Envelope.model_validate_json(message.body))

    def envelopes(self, event_type: str, resource_id: uuid.UUID | str | None = None) -> list[Envelope]:
        """The events of one type, optionally only those about one resource (see `about`)."""
        return [
            env
            for env in self.received
            if env.type == event_type and (resource_id is None or about(env) == str(resource_id))
        ]

    def of(self, event_type: str, resource_id: uuid.UUID | str | None = None) -> list[dict[str, Any]]:
        """The data of the events of one type, optionally only those about one resource."""
        return [env.data for env in self.envelopes(event_type, resource_id)]

    async def wait_for(
        self, event_type: str, resource_id: uuid.UUID | str | None, timeout_s: float = EVENT_TIMEOUT_S
    ) -> Envelope:
        """The first event of the type about the resource (any resource: None), once it has arrived."""

        def arrived() -> bool:
            return bool(self.envelopes(event_type, resource_id))

        try:
            await eventually(arrived, timeout=timeout_s, what=f"{event_type} about {resource_id}")
        except TimeoutError as exc:
            raise AssertionError(
                f"no {event_type} event for {resource_id}; got {[e.type for e in self.received]}"
            ) from exc
        return self.envelopes(event_type, resource_id)[0]

    async def wait_for_type(self, event_type: str) -> Envelope:
        return await self.wait_for(event_type, None)


@asynccontextmanager
async def listening(settings: CommonSettings, routing_keys: Iterable[str]) -> AsyncIterator[EventLog]:
    """An EventLog of what arrives on an exclusive queue of `settings`' exchange, bound with `routing_keys`."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, settings)
        queue = await channel.declare_queue(exclusive=True)  # gone with the connection
        for key in routing_keys:
            await queue.bind(exchange, key)
        log = EventLog()
        await queue.consume(log.on_message)
        yield log
    finally:
        await connection.close()


@asynccontextmanager
async def listening_through_failovers(
    settings: CommonSettings, routing_keys: Iterable[str], name: str | None = None
) -> AsyncIterator[EventLog]:
    """An EventLog fed as a service's consumer is: a durable queue of the test's own (a quorum queue where
    `settings` name a cluster), consumed through the services' own Broker, so that it outlives the loss of a
    broker node; deleted at the end. Redeliveries after a failover are recorded again (same event ids)."""
    broker = Broker(settings, "test-listener")
    await broker.connect()
    queue = name or f"test-listener-{uuid.uuid4().hex[:8]}"
    log = EventLog()

    async def record(deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            head = delivery.envelope
            log.received.append(
                Envelope(
                    event_id=head.event_id,
                    type=head.type,
                    schema_version=head.schema_version,
                    occurred_at=head.occurred_at,
                    source=head.source,
                    data=delivery.data.model_dump(mode="json"),
                )
            )

    try:
        consumer = await broker.consumer(queue, routing_keys, record)
        try:
            yield log
        finally:
            await consumer.stop()
            channel = await broker.connection.channel()
            await channel.queue_delete(settings.queue(queue))
            await channel.close()
    finally:
        await broker.close()
