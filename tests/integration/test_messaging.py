"""The batch consumer on the real RabbitMQ: a message whose handling keeps failing is dead-lettered after a
bounded number of tries while the rest of its batch is handled; a transient failure is retried until it
passes; consuming goes on."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence

import aio_pika
import pytest

from shared import events
from shared.messaging import Broker, Delivery
from shared.settings import CommonSettings
from tests.waiting import eventually


def vpc(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "test")


async def dead_letters(settings: CommonSettings) -> list[str]:
    connection = await aio_pika.connect(settings.amqp_url)
    names = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_letter_queue, durable=True)
        while True:
            with contextlib.suppress(aio_pika.exceptions.QueueEmpty):
                message = await queue.get()
                _head, data = events.decode(message.body)
                assert isinstance(data, events.VpcData)
                names.append(data.name)
                await message.ack()
                continue
            return names
    finally:
        await connection.close()


@pytest.fixture
def settings(amqp_url: str) -> CommonSettings:
    return CommonSettings(amqp_url=amqp_url, amqp_prefix=f"t{uuid.uuid4().hex[:8]}.")


async def test_a_message_that_keeps_failing_is_dead_lettered_and_the_rest_is_handled(
    settings: CommonSettings,
) -> None:
    handled: list[str] = []
    attempts: dict[str, int] = {}

    async def handler(deliveries: Sequence[Delivery]) -> None:
        names = [d.data.name for d in deliveries if isinstance(d.data, events.VpcData)]
        for name in names:
            attempts[name] = attempts.get(name, 0) + 1
        if "poison" in names:
            raise KeyError("a bug that this message triggers every time")
        handled.extend(names)

    broker = Broker(settings, "test")
    await broker.connect()
    try:
        consumer = await broker.consumer("test.poison", ["vpc.created"], handler, max_attempts=3)
        try:
            await broker.publish_many([vpc("before"), vpc("poison"), vpc("after")])
            await eventually(lambda: {"before", "after"} <= set(handled), what="the good messages handled")
            await eventually(lambda: consumer.dead_lettered == 1, what="the poison dead-lettered")
            await broker.publish(vpc("later"))
            await eventually(lambda: "later" in handled, what="consuming goes on")
        finally:
            await consumer.stop()
    finally:
        await broker.close()
    assert "poison" not in handled
    assert attempts["poison"] <= 3 + 3  # the bound, once with its batch and once alone
    assert await dead_letters(settings) == ["poison"]


async def test_a_transient_failure_is_retried_until_it_passes(settings: CommonSettings) -> None:
    handled: list[str] = []
    failures = 0

    async def handler(deliveries: Sequence[Delivery]) -> None:
        nonlocal failures
        if failures < 6:  # more than the bound of tries for a failure of the message itself
            failures += 1
            raise ConnectionRefusedError("the database is away")
        handled.extend(d.data.name for d in deliveries if isinstance(d.data, events.VpcData))

    broker = Broker(settings, "test")
    await broker.connect()
    try:
        consumer = await broker.consumer("test.transient", ["vpc.created"], handler, max_attempts=2)
        try:
            await broker.publish(vpc("patient"))
            await eventually(lambda: handled == ["patient"], timeout=60, what="handled once the failure is over")
        finally:
            await consumer.stop()
    finally:
        await broker.close()
    assert consumer.dead_lettered == 0
    assert await dead_letters(settings) == []
