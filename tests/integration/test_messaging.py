"""The batch consumer on the real RabbitMQ: a message whose handling keeps failing is dead-lettered after a
bounded number of tries while the rest of its batch is handled; a transient failure is retried until it
passes; consuming goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import pytest
from yarl import URL

from shared import events
from shared.messaging import Broker, Delivery, QueueArgumentsDiffer, declare_consumer_queue
from shared.settings import CommonSettings
from tests.ports import free_port
from tests.tcp_proxy import CuttableProxy
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


async def test_a_routine_batch_under_way_never_holds_up_another_message(settings: CommonSettings) -> None:
    """The routine lane (messages marked as renewals) is handled by a task of its own: while its handler is
    busy, a message of the main lane is handled; every message is acknowledged once handled."""
    handled: list[str] = []
    release = asyncio.Event()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        handled.extend(d.data.name for d in deliveries if isinstance(d.data, events.VpcData))

    async def routine(deliveries: Sequence[Delivery]) -> None:
        await release.wait()  # e.g. a large write of holders' refreshes
        handled.extend(f"routine {d.data.name}" for d in deliveries if isinstance(d.data, events.VpcData))

    broker = Broker(settings, "test")
    await broker.connect()
    try:
        consumer = await broker.consumer(
            "test.lanes", ["vpc.created"], handler, routine_batch=4, routine_handler=routine
        )
        try:
            for name in ("r1", "r2"):
                env = vpc(name)
                await broker.publish_encoded(env.type, events.encode(env), env.event_id, routine=True)
            await broker.publish(vpc("takeover"))
            await eventually(lambda: handled == ["takeover"], what="the main lane handled past the routine one")
            release.set()
            await eventually(lambda: len(handled) == 3, what="the routine lane handled")
            assert sorted(handled[1:]) == ["routine r1", "routine r2"]
        finally:
            release.set()
            await consumer.stop()
    finally:
        await broker.close()
    assert consumer.dead_lettered == 0
    # Everything was acknowledged: with the consumer's connection closed, nothing comes back to the queue.
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.queue("test.lanes"), passive=True)
        assert await queue.get(fail=False) is None
    finally:
        await connection.close()


async def test_a_routine_message_is_handled_only_after_the_messages_delivered_before_it(
    settings: CommonSettings,
) -> None:
    """A renewal must not overtake an older change still waiting in the main lane (after a backlog, the
    holder's later refresh decided first would make the changes of holder captured before it stale); the
    main lane is never held back by the routine one."""
    handled: list[str] = []
    release = asyncio.Event()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        names = [d.data.name for d in deliveries if isinstance(d.data, events.VpcData)]
        if "change" in names:
            await release.wait()  # e.g. a slow commit of a change of holder
        handled.extend(names)

    async def routine(deliveries: Sequence[Delivery]) -> None:
        handled.extend(f"routine {d.data.name}" for d in deliveries if isinstance(d.data, events.VpcData))

    broker = Broker(settings, "test")
    await broker.connect()
    try:
        consumer = await broker.consumer(
            "test.order", ["vpc.created"], handler, max_batch=1, routine_batch=4, routine_handler=routine
        )
        try:
            await broker.publish(vpc("change"))
            env = vpc("renewal")
            await broker.publish_encoded(env.type, events.encode(env), env.event_id, routine=True)
            await broker.publish(vpc("later"))
            # Received: the change under way, the renewal waiting for it, the later message queued behind it.
            await eventually(lambda: consumer.pending == 3, what="the three messages received")
            assert handled == []
            release.set()
            await eventually(lambda: len(handled) == 3, what="all three handled")
            assert handled.index("change") < handled.index("routine renewal")
        finally:
            release.set()
            await consumer.stop()
    finally:
        await broker.close()
    assert consumer.dead_lettered == 0


def wrong_password(url: URL) -> URL:
    return url.with_password("not-" + (url.password or ""))


def unknown_vhost(url: URL) -> URL:
    return url.with_path(f"/no-such-vhost-{uuid.uuid4().hex[:6]}")


def nobody_listening(url: URL) -> URL:
    return url.with_port(free_port())


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        (wrong_password, "refused the login of user 'guest': wrong user name or password"),
        (unknown_vhost, "has no virtual host 'no-such-vhost-"),
        (nobody_listening, "nothing accepts connections at 127.0.0.1:"),
    ],
)
async def test_a_broker_that_cannot_be_used_is_explained_once_then_waited_for_quietly(
    amqp_url: str, caplog: pytest.LogCaptureFixture, spoil: Callable[[URL], URL], words: str
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = Broker(CommonSettings(amqp_url=str(spoil(URL(amqp_url)))), "test")
    stop = asyncio.Event()
    connecting = asyncio.create_task(broker.connect(stop, max_delay_s=0.1))
    await eventually(lambda: broker.connect_attempts >= 5, what="five attempts")
    stop.set()
    assert await asyncio.wait_for(connecting, 30) is False
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert words in said[0].getMessage()
    assert "Traceback" not in caplog.text
    assert "Reconnecting after" not in caplog.text  # aio-pika's notice of each first attempt, left out


async def test_a_broker_that_comes_back_is_used_and_said_so(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.messaging")
    with CuttableProxy() as proxy:
        proxy.cut()
        broker = Broker(CommonSettings(amqp_url=proxy.url(amqp_url)), "test")
        connecting = asyncio.create_task(broker.connect(max_delay_s=0.2))
        await eventually(lambda: broker.connect_attempts >= 2, what="two attempts")
        proxy.start()
        assert await asyncio.wait_for(connecting, 30) is True
        try:
            await broker.publish(vpc("after-the-wait"))
        finally:
            await broker.close()
    assert "connected to rabbitmq" in caplog.text


async def test_a_single_active_consumer_queue_delivers_to_one_then_to_the_next_and_dead_letters(
    settings: CommonSettings,
) -> None:
    """Two processes' consumers on one single-active-consumer queue: only the first registered is delivered to;
    when its connection drops without a clean close (a cut), the waiting one gets the next messages at once, the
    first is told its channel closed, and a message refused by the handler still goes to the dead-letter queue."""
    seen: dict[str, list[str]] = {"first": [], "second": []}
    closed: list[str] = []

    def closing(who: str) -> Callable[[], None]:
        return lambda: closed.append(who)

    def handler_of(who: str) -> Callable[[Sequence[Delivery]], Awaitable[None]]:
        async def handler(deliveries: Sequence[Delivery]) -> None:
            names = [d.data.name for d in deliveries if isinstance(d.data, events.VpcData)]
            if "poison" in names:
                raise events.InvalidEvent("refused by the handler")
            seen[who].extend(names)

        return handler

    publisher = Broker(settings, "test")
    await publisher.connect()
    with CuttableProxy() as proxy:
        first_broker = Broker(settings.model_copy(update={"amqp_url": proxy.url(settings.amqp_url)}), "first")
        second_broker = Broker(settings, "second")
        await first_broker.connect()
        await second_broker.connect()
        try:
            first, second = [
                await broker.consumer(
                    "test.single",
                    ["vpc.created"],
                    handler_of(who),
                    single_active=True,
                    on_channel_closed=closing(who),
                )
                for broker, who in ((first_broker, "first"), (second_broker, "second"))
            ]
            await publisher.publish_many([vpc(f"m{i}") for i in range(20)])
            await eventually(lambda: len(seen["first"]) == 20, what="every message to the first")
            assert seen["second"] == []

            proxy.cut()
            await eventually(lambda: closed == ["first"], what="the first told its channel closed")
            await publisher.publish_many([vpc("after"), vpc("poison")])
            await eventually(lambda: seen["second"] == ["after"], what="the next message to the second")
            await eventually(lambda: second.dead_lettered == 1, what="the refused message dead-lettered")
            assert await dead_letters(settings) == ["poison"]
            await first.stop()
            await second.stop()
        finally:
            await first_broker.close()
            await second_broker.close()
            await publisher.close()


async def test_a_queue_of_another_kind_already_there_is_refused_in_words(settings: CommonSettings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(settings.queue("test.older"), durable=True)
        with pytest.raises(QueueArgumentsDiffer, match="delete the queue") as refused:
            await declare_consumer_queue(
                await connection.channel(), settings, "test.older", ["vpc.created"], single_active=True
            )
        assert refused.value.exit_code == 2
        assert "PRECONDITION_FAILED" in str(refused.value)
    finally:
        await connection.close()
