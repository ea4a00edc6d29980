"""Composition root of the binding service: wires Postgres, RabbitMQ and the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from services.binding import metrics
from services.binding.clock import SystemClock
from services.binding.hops import ClaimHops
from services.binding.leases import LeaseSettings, PartitionLeases
from services.binding.outgoing import SOURCE
from services.binding.refusal_audit import MAX_SUMMARISED_CLAIMANTS
from services.binding.repository import INVENTORY_CHANNEL, SCHEMA, WriteConflict, log_inventory
from services.binding.service import INVENTORY_EVENTS, BindingService
from services.binding.settings import BindingSettings
from shared.database_health import DATABASE_HEALTH_INTERVAL_S, DatabaseHealth
from shared.db import ConnectionPool, create_pool, database_or_network_away
from shared.events import REPLAY_REQUESTED, WATCHER_HEARTBEAT_EVENT
from shared.heap import freeze_startup_heap
from shared.logging import configure_logging
from shared.messaging import BatchConsumer, Broker, Delivery, QueueSpec, until_granted
from shared.metrics import serve_metrics
from shared.migrations import service_role
from shared.outbox import OutboxRelay
from shared.partitions import claims_routing_key
from shared.periodic import run_periodically
from shared.runtime import StartupError, serve
from shared.service_setup import declare_queues, migrate_service
from shared.settings import print_invalid_settings
from shared.tasks import cancel, until_stopped

log = logging.getLogger(__name__)

T = TypeVar("T")


MIGRATIONS = Path(__file__).with_name("migrations")
# The binding's statements are set-based over arrays of parameters: their plan does not depend on the values. Left
# to choose, Postgres planned the decisions' statement anew on every execution (a generic plan's estimate never won
# over a custom one): 0.4–0.5 ms of planning for a statement that runs in 0.4 ms (docs/benchmarks.md).
DATABASE_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


def database_settings(settings: BindingSettings) -> dict[str, str]:
    """The pool's server settings. A replica frozen (SIGSTOP, a stalled VM) inside a write transaction would keep
    its row locks, and the replica that took its partitions over would wait on them until it thawed: Postgres
    ends such a transaction once it has been idle as long as a lease lasts — by then its partitions are another
    replica's, and its write, conditional on sequences, could not have committed anyway."""
    idle_ms = int(settings.lease_timeout_s * 1000)
    return DATABASE_SETTINGS | {"idle_in_transaction_session_timeout": str(idle_ms)}


# Older versions consumed everything from this one queue; `migrate` deletes it once it is empty and unused.
RETIRED_QUEUE = "binding.events"
# The inventory events, for the one replica at a time that logs them (single active consumer).
INVENTORY_QUEUE = QueueSpec("binding.inventory", INVENTORY_EVENTS, single_active=True)
# How long the inventory log keeps a row: far beyond any replica's lag (one starting loads a snapshot instead).
INVENTORY_LOG_RETENTION_S = 86_400.0


def partition_queue(partition: int) -> QueueSpec:
    """A partition's queue: its claims, the watchers' heartbeats (so that every replica deciding a partition hears
    them) and, for partition 0, readers' replay requests. A quorum queue with a single active consumer: the
    replica holding the partition's lock consumes it; a replica that lost the lock but not yet its channel
    (frozen) keeps the broker from delivering to two."""
    keys = (claims_routing_key(partition), WATCHER_HEARTBEAT_EVENT)
    return QueueSpec(
        f"binding.partition.{partition}",
        keys + ((REPLAY_REQUESTED,) if partition == 0 else ()),
        single_active=True,
    )


def queues(settings: BindingSettings) -> list[QueueSpec]:
    return [INVENTORY_QUEUE, *(partition_queue(p) for p in range(settings.partitions))]


async def log_inventory_events(pool: ConnectionPool, deliveries: Sequence[Delivery]) -> None:
    """The active consumer of binding.inventory: each event's projection and its row in the inventory log, in one
    transaction (the replicas follow the log, woken at the commit)."""
    async with pool.acquire() as conn, conn.transaction():
        await log_inventory(conn, [(d.envelope, d.data) for d in deliveries])


async def migrate(settings: BindingSettings) -> None:
    """Database schema, and the service's queues, so that no event published before its first start is lost."""
    await migrate_service(
        settings,
        source=SOURCE,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        queues=queues(settings),
        retired=[RETIRED_QUEUE],
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
    await service.expire_inventory_log(INVENTORY_LOG_RETENTION_S)


async def run(settings: BindingSettings, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            settings.database_url,
            role=settings.database_role or service_role(SCHEMA),
            settings=database_settings(settings),
            stop=stop,
        )
        if pool is None:
            return
        stack.push_async_callback(pool.close)
        broker = Broker(settings, SOURCE)
        stack.push_async_callback(broker.close)
        if not await broker.connect(stop):
            return
        # Every queue exists before any replica consumes it: what is published meanwhile waits there. A right its
        # broker user lacks is said once, in words, and waited for (docs/operations.md).
        if await until_granted(partial(_declare_queues, broker, settings), stop=stop) is None:
            log.info("stopped before its queues were declared")
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
            partitions=settings.partitions,
            owned=(),
            watcher_user_template=settings.watcher_user_template,
        )
        metrics.PARTITIONS.set(settings.partitions)
        # Every replica registers on binding.inventory; RabbitMQ delivers to one at a time, which logs the events.
        inventory = await until_stopped(
            broker.consumer(
                INVENTORY_QUEUE.name,
                INVENTORY_QUEUE.routing_keys,
                partial(log_inventory_events, pool),
                prefetch=settings.prefetch,
                max_batch=settings.max_batch,
                transient=database_or_network_away,
                single_active=True,
            ),
            stop,
        )
        if inventory is None:
            log.info("stopped before consuming")
            return
        stack.push_async_callback(inventory.stop)
        service.drain_inventory = partial(_drain_inventory, service, inventory)
        await service.load()
        freeze_startup_heap()  # the modules and the book loaded: out of the collector's reach
        relay.start()
        stack.push_async_callback(relay.stop)  # after the consumers' last batch: what they committed leaves too
        if settings.metrics_port:
            serve_metrics(settings.metrics_port, settings.metrics_host)
        health = DatabaseHealth(pool, settings.database_url, settings.database_monitor_url)
        watching = asyncio.create_task(
            run_periodically(health.check, DATABASE_HEALTH_INTERVAL_S, what="database health", at_start=True),
            name="database health",
        )
        stack.push_async_callback(cancel, watching)
        following = asyncio.Event()  # set by NOTIFY havip_binding_inventory
        follower = asyncio.create_task(_follow_inventory(service, following), name="following the inventory log")
        stack.push_async_callback(cancel, follower)
        partitions = _PartitionConsumers(settings, broker, service)
        stack.push_async_callback(partitions.stop_all)
        leases = PartitionLeases(
            LeaseSettings(
                settings.database_url,
                settings.partitions,
                start=zlib.crc32(settings.replica_id.encode()) % settings.partitions,
                interval_s=settings.lease_interval_s,
                timeout_s=settings.lease_timeout_s,
                scope=settings.amqp_prefix,
            ),
            acquired=partitions.start,
            releasing=partitions.stop,
            able=broker.connection.connected.is_set,
            listen={INVENTORY_CHANNEL: following.set},
        )
        metrics.REPLICAS.set_function(lambda: leases.replicas)
        metrics.PARTITION_COUNTS.set_function(lambda: leases.partition_counts)
        lease_task = asyncio.create_task(leases.run(stop), name="partition leases")
        stack.push_async_callback(cancel, lease_task)  # first on the way out, should the loop below fail
        log.info(
            "binding service running: deciding the partitions whose advisory locks it holds",
            extra={"replica": settings.replica_id, "partitions": settings.partitions},
        )
        if ready is not None:
            ready.set()
        while await until_stopped(service.until_deciding(), stop) is not None:
            if not await _decide_until_standing_by(settings, service, stop):
                break
        log.info("stopping: handing the partitions over, then the outbox is published")
        await lease_task  # `stop` is set: it drains (each partition's batch under way committed, its lock freed)
    log.info("stopped")


async def _declare_queues(broker: Broker, settings: BindingSettings) -> bool:
    await declare_queues(broker, settings, queues(settings))
    return True


async def _follow_inventory(service: BindingService, woken: asyncio.Event) -> None:
    """Apply the inventory log as it grows: at each commit's NOTIFY, and every second should one be missed."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), 1.0)
        woken.clear()
        try:
            while await service.follow_inventory():
                pass
        except Exception:
            log.exception("following the inventory log failed; trying again")


async def _drain_inventory(service: BindingService, inventory: BatchConsumer) -> None:
    """Before a claim naming what this book does not know: the inventory published so far is logged (by whichever
    replica consumes binding.inventory) and applied here — bounded: a registration never published waits no
    longer."""
    await inventory.until_drained(timeout_s=1.0)  # every event published so far taken by the writer
    await service.until_inventory_written()  # and the writer's transaction under way committed
    while await service.follow_inventory():
        pass


def _transient(exc: BaseException) -> bool:
    """What the consumer retries for as long as it lasts: the database or network away, and a write that kept
    conflicting with another replica's (two replicas overlapping on a partition: it ends when one lets go)."""
    return database_or_network_away(exc) or isinstance(exc, WriteConflict)


class _PartitionConsumers:
    """The consumers of the partitions this replica holds: started once a lock is taken, stopped (the batch under
    way committed and acknowledged, the channel closed so that RabbitMQ hands the queue on) before it is freed."""

    def __init__(self, settings: BindingSettings, broker: Broker, service: BindingService) -> None:
        self._settings = settings
        self._broker = broker
        self._service = service
        self._consumers: dict[int, BatchConsumer] = {}

    async def start(self, partition: int) -> None:
        await self._service.own(partition)
        spec = partition_queue(partition)
        settings = self._settings
        self._consumers[partition] = await self._broker.consumer(
            spec.name,
            spec.routing_keys,
            self._service.handle,
            prefetch=settings.prefetch,
            max_batch=settings.max_batch,
            transient=_transient,
            routine_batch=settings.routine_batch,
            routine_handler=self._service.handle_routine,
            single_active=True,
            on_channel_closed=self._service.channel_lost,
        )

    async def stop(self, partition: int) -> None:
        consumer = self._consumers.pop(partition, None)
        if consumer is not None:
            await consumer.stop()
        await self._service.disown(partition)

    async def stop_all(self) -> None:
        for partition in list(self._consumers):
            await self.stop(partition)


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
