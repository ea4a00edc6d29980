"""Moving a deployment from classic queues to quorum queues (a cluster named in HAVIP_AMQP_URL, or
HAVIP_AMQP_QUEUE_TYPE=quorum): the service's `migrate` replaces each queue of the other kind — its own and the
dead-letter queue — while it is empty and unused; one that still holds messages is kept, nothing in it lost, and
the refusal says what to do. Quorum queues dead-letter a message delivered too many times (a consumer that dies
on it each time)."""

from __future__ import annotations

import os
import subprocess
import time

import aio_pika
import pytest
from yarl import URL

from services.allocator.__main__ import migrate
from services.allocator.binding_view.service import QUEUE as VIEW_QUEUE
from shared.messaging import DELIVERY_LIMIT, QueueArgumentsDiffer
from shared.settings import CommonSettings
from tests.conftest import AMQP_BASE
from tests.sandbox import temporary_vhost


def kind_of(amqp_url: str, name: str) -> str:
    """The queue's type as RabbitMQ lists it ('classic' or 'quorum')."""
    vhost = URL(amqp_url).path[1:]
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "type"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    kinds = dict(line.split("\t")[:2] for line in listed.splitlines() if "\t" in line)
    return kinds[name]


async def publish_to(amqp_url: str, name: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)
    finally:
        await connection.close()


async def messages_in(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    try:
        queue = await (await connection.channel()).declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


async def test_migrate_moves_a_classic_deployment_to_quorum_queues_keeping_what_holds_messages(
    database_url: str,
) -> None:
    with temporary_vhost(AMQP_BASE, f"havip-test-kind-{os.getpid()}-{time.monotonic_ns()}") as amqp_url:
        classic = CommonSettings(database_url=database_url, amqp_url=amqp_url, amqp_queue_type="classic")
        quorum = CommonSettings(database_url=database_url, amqp_url=amqp_url, amqp_queue_type="quorum")
        await migrate(classic)
        assert kind_of(amqp_url, VIEW_QUEUE) == "classic"
        assert kind_of(amqp_url, classic.dead_letter_queue) == "classic"

        # A message waits in the dead-letter queue: it is kept, and migrate refuses in words.
        await publish_to(amqp_url, classic.dead_letter_queue, [b"poison"])
        with pytest.raises(QueueArgumentsDiffer, match="HAVIP_AMQP_QUEUE_TYPE") as refused:
            await migrate(quorum)
        assert classic.dead_letter_queue in str(refused.value)
        assert await messages_in(amqp_url, classic.dead_letter_queue) == 1

        # Emptied (an operator read it), the next migrate replaces both queues.
        connection = await aio_pika.connect(amqp_url)
        try:
            dead = await (await connection.channel()).declare_queue(classic.dead_letter_queue, passive=True)
            await dead.purge()
        finally:
            await connection.close()
        await migrate(quorum)
        assert kind_of(amqp_url, VIEW_QUEUE) == "quorum"
        assert kind_of(amqp_url, quorum.dead_letter_queue) == "quorum"
        await migrate(quorum)  # idempotent
        assert kind_of(amqp_url, VIEW_QUEUE) == "quorum"


async def test_a_message_redelivered_past_the_limit_is_dead_lettered(database_url: str) -> None:
    with temporary_vhost(AMQP_BASE, f"havip-test-limit-{os.getpid()}-{time.monotonic_ns()}") as amqp_url:
        settings = CommonSettings(database_url=database_url, amqp_url=amqp_url, amqp_queue_type="quorum")
        await migrate(settings)
        await publish_to(amqp_url, VIEW_QUEUE, [b"crashes every consumer"])
        for _ in range(DELIVERY_LIMIT + 1):  # each time a consumer gets it and dies before acknowledging it
            connection = await aio_pika.connect(amqp_url)
            try:
                queue = await (await connection.channel()).declare_queue(VIEW_QUEUE, passive=True)
                message = await queue.get(fail=False)
            finally:
                await connection.close()
            if message is None:
                break
        assert await messages_in(amqp_url, VIEW_QUEUE) == 0
        assert await messages_in(amqp_url, settings.dead_letter_queue) == 1
