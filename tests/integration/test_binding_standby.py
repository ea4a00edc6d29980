"""One binding service decides at a time: a second one on the same database and broker does not consume beside
the first (inventory and claims share one ordered queue — split between two consumers, each would refuse the
claims of instances only the other learnt about). It waits as a standby, saying so, and takes over when the
first stops, deciding from what is committed. Two real binding services, in this process, on real Postgres and
RabbitMQ."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import pytest
from prometheus_client import REGISTRY

from services.binding.main import QUEUE, run
from services.binding.settings import BindingSettings
from shared.messaging import Broker
from tests.integration.binding_support import World, transitions
from tests.tcp_proxy import CuttableProxy
from tests.waiting import eventually

DEADLINE_S = 30.0


@dataclass
class Running:
    stop: asyncio.Event
    ready: asyncio.Event
    task: asyncio.Task[None]

    async def stopped(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, DEADLINE_S)


@asynccontextmanager
async def binding_service(settings: BindingSettings) -> AsyncIterator[Running]:
    stop, ready = asyncio.Event(), asyncio.Event()
    running = Running(stop, ready, asyncio.create_task(run(settings, stop, ready)))
    try:
        yield running
    finally:
        if not running.task.done():
            await running.stopped()


async def consumers(settings: BindingSettings) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        return queue.declaration_result.consumer_count or 0
    finally:
        await connection.close()


def consuming_gauge() -> float | None:
    return REGISTRY.get_sample_value("havip_binding_consuming")


@pytest.fixture
async def settings(database_url: str, amqp_url: str) -> BindingSettings:
    return BindingSettings(database_url=database_url, amqp_url=amqp_url, metrics_port=0)


async def test_a_second_binding_waits_as_a_standby_then_takes_over_from_what_is_committed(
    settings: BindingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.messaging")
    w = World()
    publisher = Broker(settings, "test")
    await publisher.connect()
    try:
        async with binding_service(settings) as first:
            await asyncio.wait_for(first.ready.wait(), DEADLINE_S)
            async with binding_service(settings) as second:
                await eventually(
                    lambda: "waiting as a standby" in caplog.text,
                    timeout=DEADLINE_S,
                    what="the standby's log line",
                )
                assert await consumers(settings) == 1
                assert not second.ready.is_set()
                assert consuming_gauge() == 0  # this process's gauge: the second spoke last

                # While the second waits, the first learns everything and decides.
                await publisher.publish_many(w.inventory())
                await publisher.publish(w.claim(w.cvm1.mac))
                await eventually(
                    lambda: _count(settings, w, 1), timeout=DEADLINE_S, what="the first's transition to cvm1"
                )

                await first.stopped()
                await asyncio.wait_for(second.ready.wait(), DEADLINE_S)
                assert "no longer a standby" in caplog.text
                assert consuming_gauge() == 1
                assert await consumers(settings) == 1
                # cvm2 was registered while the second was a standby: it is known all the same.
                await publisher.publish(w.claim(w.cvm2.mac))
                await eventually(
                    lambda: _count(settings, w, 2), timeout=DEADLINE_S, what="the second's transition to cvm2"
                )
                history = await transitions(settings.database_url, w.havip.id)
                assert [(t["sequence"], t["to_instance_id"]) for t in history] == [(1, w.cvm1.id), (2, w.cvm2.id)]
    finally:
        await publisher.close()


async def test_a_standby_stops_at_once_when_asked(
    settings: BindingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with binding_service(settings) as first:
        await asyncio.wait_for(first.ready.wait(), DEADLINE_S)
        async with binding_service(settings) as second:
            await eventually(
                lambda: "waiting as a standby" in caplog.text, timeout=DEADLINE_S, what="the standby's log line"
            )
            await second.stopped()
            assert "stopped while a standby" in caplog.text
        assert await consumers(settings) == 1  # the first consumes on


async def _count(settings: BindingSettings, w: World, expected: int) -> bool:
    return len(await transitions(settings.database_url, w.havip.id)) == expected


async def test_a_binding_that_loses_its_connection_stops_deciding_and_becomes_the_standby(
    settings: BindingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker drops the deciding process's connection (a network blip): the standby takes the queue over;
    the first, back on the broker, finds the queue taken and waits as the standby in turn — it never decides
    beside the second — and decides again, from what is committed, once the second stops."""
    caplog.set_level(logging.INFO)
    w = World()
    publisher = Broker(settings, "test")
    await publisher.connect()
    try:
        with CuttableProxy() as proxy:
            through_proxy = settings.model_copy(update={"amqp_url": proxy.url(settings.amqp_url)})
            async with binding_service(through_proxy) as first:
                await asyncio.wait_for(first.ready.wait(), DEADLINE_S)
                async with binding_service(settings) as second:
                    await eventually(lambda: _said(caplog, "waiting as a standby") == 1, what="the second's wait")
                    await publisher.publish_many(w.inventory())
                    await publisher.publish(w.claim(w.cvm1.mac))
                    await eventually(lambda: _count(settings, w, 1), timeout=DEADLINE_S, what="cvm1 by the first")

                    proxy.cut()
                    await eventually(lambda: _said(caplog, "lost binding.events") == 1, what="the first's loss")
                    await asyncio.wait_for(second.ready.wait(), DEADLINE_S)
                    proxy.start()
                    await eventually(
                        lambda: _said(caplog, "waiting as a standby") == 2,
                        timeout=DEADLINE_S,
                        what="the first, reconnected, waiting as the standby",
                    )
                    assert await consumers(settings) == 1
                    await publisher.publish(w.claim(w.cvm2.mac))
                    await eventually(lambda: _count(settings, w, 2), timeout=DEADLINE_S, what="cvm2 by the second")

                await eventually(
                    lambda: _said(caplog, "no longer a standby") == 2, timeout=DEADLINE_S, what="the first again"
                )
                await publisher.publish(w.claim(w.cvm1.mac))
                await eventually(lambda: _count(settings, w, 3), timeout=DEADLINE_S, what="cvm1 by the first")
        history = await transitions(settings.database_url, w.havip.id)
        assert [t["sequence"] for t in history] == [1, 2, 3]
        assert [t["to_instance_id"] for t in history] == [w.cvm1.id, w.cvm2.id, w.cvm1.id]
    finally:
        await publisher.close()


def _said(caplog: pytest.LogCaptureFixture, words: str) -> int:
    # Our own lines only: an aio-pika record of a closing channel fails to format (its callback's repr).
    return sum(words in r.getMessage() for r in caplog.records if r.name.startswith(("shared.", "services.")))
