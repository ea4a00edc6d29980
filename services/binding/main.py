"""Composition root of the binding service: wires Postgres, RabbitMQ and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from services.binding.clock import SystemClock
from services.binding.hops import ClaimHops
from services.binding.outgoing import SOURCE
from services.binding.refusal_audit import MAX_SUMMARISED_CLAIMANTS
from services.binding.repository import SCHEMA
from services.binding.service import SUBSCRIPTIONS, BindingService
from services.binding.settings import BindingSettings
from shared.db import create_pool, database_or_network_away
from shared.heap import freeze_startup_heap
from shared.logging import configure_logging
from shared.messaging import BatchHandler, Broker, Delivery
from shared.metrics import serve_metrics
from shared.migrations import service_role
from shared.outbox import OutboxRelay
from shared.periodic import run_periodically
from shared.runtime import StartupError, serve
from shared.service_setup import migrate_service
from shared.settings import print_invalid_settings
from shared.tasks import cancel, until_stopped

log = logging.getLogger(__name__)

T = TypeVar("T")


MIGRATIONS = Path(__file__).with_name("migrations")
# The binding's statements are set-based over arrays of parameters: their plan does not depend on the values. Left
# to choose, Postgres planned the decisions' statement anew on every execution (a generic plan's estimate never won
# over a custom one): 0.4–0.5 ms of planning for a statement that runs in 0.4 ms (docs/benchmarks.md).
DATABASE_SETTINGS = {"plan_cache_mode": "force_generic_plan"}
QUEUE = "binding.events"


async def migrate(settings: BindingSettings) -> None:
    """Database schema, and the service's queue, so that no event published before its first start is lost."""
    await migrate_service(
        settings,
        source=SOURCE,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        queue=QUEUE,
        subscriptions=SUBSCRIPTIONS,
        single_active=True,
    )


async def log_refusals(service: BindingService, interval_s: float) -> None:
    """One line per interval while claims are refused: an operator sees a spoofer (or a misconfigured server)
    in the log without a line per frame."""
    summary = service.take_refusal_summary()
    if summary is not None:
        log.warning(
            "claims refused in the last %.0f s: %d frames from %s claimants (address, MAC)",
            interval_s,
            sum(summary.frames_by_reason.values()),
            f"{summary.claimants:,}"
            if summary.claimants < MAX_SUMMARISED_CLAIMANTS
            else f"over {MAX_SUMMARISED_CLAIMANTS:,}",
            extra={"frames_by_reason": summary.frames_by_reason},
        )


async def tick(service: BindingService, ticks: Iterator[int], audit_retention_days: float) -> None:
    """Time passing ends flapping and split brain (every second), and ages the audit out (once a minute)."""
    minute_begins = next(ticks) % 60 == 0
    await service.tick()
    if not minute_begins:
        return
    expired = await service.expire_audit(audit_retention_days)
    if expired:
        log.info("refused claims past retention deleted", extra={"deleted": expired})


async def run(settings: BindingSettings, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.database_url,
            role=settings.database_role or service_role(SCHEMA),
            settings=DATABASE_SETTINGS,
            stop=stop,
        )
        if pool is None:
            return
        stack.push_async_callback(pool.close)
        broker = Broker(settings, SOURCE)
        stack.push_async_callback(broker.close)
        if not await broker.connect(stop):
            return
        hops = ClaimHops()
        relay = OutboxRelay(pool, broker, SCHEMA, on_published=hops.published)
        service = BindingService(
            pool,
            on_commit=relay.wake,
            clock=SystemClock(),
            max_clock_skew_s=settings.max_clock_skew_s,
            policy=settings.condition_policy(),
            refusal_audit_rate=settings.refusal_audit_rate,
            hops=hops,
        )
        await service.load()
        freeze_startup_heap()  # the modules and the book loaded: out of the collector's reach
        relay.start()
        stack.push_async_callback(relay.stop)  # after the consumer's last batch: what it committed leaves too
        if settings.metrics_port:
            serve_metrics(settings.metrics_port, settings.metrics_host)
        # One process decides: the queue's active consumer. Inventory and claims share that one ordered queue, so
        # a second consumer taking half of them would refuse claims of instances only the first learnt about.
        # Every process registers at once; RabbitMQ delivers to one (single active consumer) and, when that
        # one's channel or connection is gone, to another at once. A process learns it is the active one from
        # a delivery (takes over: reloads its book, then decides); it stops deciding — ticks included — when
        # its channel closes, until RabbitMQ delivers to it again.
        service.stand_by()  # until a delivery: the book loaded above may be behind another process's decisions
        consumer = await until_stopped(
            broker.consumer(
                QUEUE,
                SUBSCRIPTIONS,
                partial(_decide_as_the_active_consumer, service, service.handle),
                prefetch=settings.prefetch,
                max_batch=settings.max_batch,
                transient=database_or_network_away,
                routine_batch=settings.routine_batch,
                routine_handler=partial(_decide_as_the_active_consumer, service, service.handle_routine),
                single_active=True,
                on_channel_closed=service.stand_by,
            ),
            stop,
        )
        if consumer is None:
            log.info("stopped before consuming")
            return
        stack.push_async_callback(consumer.stop)
        log.info(
            "binding service running: deciding once RabbitMQ delivers to this process",
            extra={"queue": settings.queue(QUEUE)},
        )
        if ready is not None:
            ready.set()
        while await until_stopped(service.until_deciding(), stop) is not None:
            if not await _decide_until_standing_by(settings, service, stop):
                break
        log.info("stopping: the batch under way is committed, then the outbox is published")
    log.info("stopped")


async def _decide_as_the_active_consumer(
    service: BindingService, handler: BatchHandler, deliveries: Sequence[Delivery]
) -> None:
    """RabbitMQ delivers to the queue's active consumer only: a delivery to a process that is not deciding
    makes it the one that decides, from what is committed."""
    if not service.deciding:
        await service.take_over()
    await handler(deliveries)


async def _decide_until_standing_by(
    settings: BindingSettings, service: BindingService, stop: asyncio.Event
) -> bool:
    """Run the periodic work of the deciding process until it stands by (True) or is stopped (False)."""
    async with contextlib.AsyncExitStack() as stack:
        interval = settings.refusal_log_interval_s
        for work, interval_s, what in (
            # A failed tick (database away) is retried at the next.
            (partial(tick, service, itertools.count(), settings.audit_retention_days), 1.0, "binding tick"),
            # Refusal audit rows waiting for the pacer's budget go out in bites, ten times a second.
            (service.release_refusals, 0.1, "writing paced refusals"),
            (partial(log_refusals, service, interval), interval, "refusal log"),
        ):
            periodic = asyncio.create_task(run_periodically(work, interval_s, what=what, logger=log), name=what)
            stack.push_async_callback(cancel, periodic)
        return await until_stopped(service.until_standing_by(), stop) is not None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = BindingSettings()
    except ValidationError as exc:
        return print_invalid_settings(BindingSettings, exc)
    configure_logging(SOURCE, settings.log_level)
    if args == ["migrate"]:
        try:
            asyncio.run(migrate(settings))
        except StartupError as exc:
            log.error("%s", exc)
            return exc.exit_code
        return 0
    if args:
        print("usage: python -m services.binding [migrate]", file=sys.stderr)
        return 2
    return serve(run, settings)
