"""Binding replicas: any number of `python -m services.binding` processes on one database and broker share the
partitions — each partition decided by the replica holding its Postgres advisory lock, consuming its quorum queue
(single active consumer). A replica killed, stopped or frozen hands its partitions over; the next claims are
decided from what is committed, and no history gets a wrong, lost or duplicate transition. Real processes (each
with its own metrics port), real Postgres and RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import aio_pika
import asyncpg
import httpx
import pytest
from yarl import URL

from services.binding.main import RETIRED_QUEUE, migrate
from services.binding.settings import BindingSettings
from shared.messaging import Broker
from shared.settings import CommonSettings
from tests import service_logs
from tests.conftest import AMQP_BASE
from tests.integration.binding_support import World, transitions, worlds_in_partitions
from tests.lab.proc import terminate_group
from tests.metrics_text import value
from tests.ports import free_port
from tests.sandbox import temporary_vhost
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0
PARTITIONS = 6
# What the test demands of a takeover after a replica is killed; the figure printed is what it took
# (bench/standby.py measures it: the lease poll and the partition's bindings read).
TAKEOVER_BOUND_S = 10.0


class BindingProcess:
    """`python -m services.binding`, its JSON log in a file and its metrics on a port of its own."""

    def __init__(
        self, name: str, database_url: str, amqp_url: str, logs: Path, extra: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.log_path = logs / f"{name}.log"
        service_logs.follow(name, self.log_path, per_test=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")},
            "HAVIP_DATABASE_URL": database_url,
            "HAVIP_AMQP_URL": amqp_url,
            "HAVIP_METRICS_PORT": str(self.metrics_port),
            "HAVIP_METRICS_HOST": "127.0.0.1",
            "HAVIP_REPLICA_ID": name,
            "HAVIP_PARTITIONS": str(PARTITIONS),
            **(extra or {}),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.binding"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def said(self, words: str) -> int:
        return sum(words in str(line.get("msg", "")) for line in self.lines())

    def lines(self) -> list[dict[str, object]]:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def partitions(self) -> set[int]:
        """The partitions this replica holds now, by what it logged."""
        held: set[int] = set()
        for line in self.lines():
            partition = line.get("partition")
            if not isinstance(partition, int):
                continue
            if str(line.get("msg", "")).startswith("deciding partition"):
                held.add(partition)
            elif str(line.get("msg", "")).startswith("handed partition"):
                held.discard(partition)
        return held

    async def gauge(self, name: str) -> float | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}")
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        except httpx.TransportError:
            return None
        return value(response.text, name)

    async def owned(self) -> float | None:
        return await self.gauge("havip_binding_partitions_owned")

    async def running(self) -> None:
        await eventually(lambda: self.said("binding service running") == 1, timeout=DEADLINE_S, what=self.name)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE_S)


class BindingProcessFactory(Protocol):
    def __call__(self, name: str, extra: Mapping[str, str] | None = None) -> BindingProcess: ...


@pytest.fixture
def start(database_url: str, amqp_url: str, tmp_path: Path) -> Iterator[BindingProcessFactory]:
    started: list[BindingProcess] = []

    def starting(name: str, extra: Mapping[str, str] | None = None) -> BindingProcess:
        process = BindingProcess(name, database_url, amqp_url, tmp_path, extra)
        started.append(process)
        return process

    yield starting
    for process in started:
        if process.proc.poll() is None:
            os.killpg(process.proc.pid, signal.SIGCONT)  # a test that froze one and failed
        terminate_group(process.proc, timeout=15)


@pytest.fixture
async def publisher(database_url: str, amqp_url: str) -> AsyncIterator[Broker]:
    """Publishes as the allocator and the watchers do, after `migrate` (as a deployment runs it before the
    services: their queues exist, so that what is published before a replica starts waits for it)."""
    await migrate(BindingSettings(database_url=database_url, amqp_url=amqp_url, partitions=PARTITIONS))
    broker = Broker(CommonSettings(amqp_url=amqp_url, partitions=PARTITIONS), "test")
    await broker.connect()
    yield broker
    await broker.close()


async def shares(*replicas: BindingProcess) -> list[float | None]:
    return [await r.owned() for r in replicas]


async def spread_evenly(*replicas: BindingProcess) -> bool:
    """Every partition held, each replica its ⌈P/N⌉ or ⌊P/N⌋."""
    owned = await shares(*replicas)
    if None in owned or sum(o or 0 for o in owned) != PARTITIONS:
        return False
    low, high = PARTITIONS // len(replicas), -(-PARTITIONS // len(replicas))
    return all(low <= (o or 0) <= high for o in owned)


async def history_of(database_url: str, w: World) -> list[tuple[int, object]]:
    return [(t["sequence"], t["to_instance_id"]) for t in await transitions(database_url, w.havip.id)]


async def test_replicas_share_the_partitions_and_a_killed_ones_partitions_are_taken_over(
    database_url: str, start: BindingProcessFactory, publisher: Broker
) -> None:
    worlds = worlds_in_partitions(PARTITIONS)
    for w in worlds.values():
        await publisher.publish_many(w.inventory())
    a = start("binding-a")
    await a.running()
    await eventually(lambda: spread_evenly(a), timeout=DEADLINE_S, what="one replica holding every partition")
    b, c = start("binding-b"), start("binding-c")
    await eventually(lambda: spread_evenly(a, b, c), timeout=DEADLINE_S, what="two partitions each")
    assert await c.gauge("havip_binding_replicas") == 3
    assert await c.gauge("havip_binding_partition_counts") == 1
    assert sorted(p for r in (a, b, c) for p in r.partitions()) == list(range(PARTITIONS))

    for w in worlds.values():  # every partition decided, whichever replica holds it
        await publisher.publish(w.claim(w.cvm1.mac))
    for w in worlds.values():
        await eventually(history_becomes(database_url, w, [w.cvm1.id]), timeout=DEADLINE_S, what="bound")

    victim_partitions = b.partitions()
    os.killpg(b.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for partition in victim_partitions:
        w = worlds[partition]
        await publisher.publish(w.claim(w.cvm2.mac))
    for partition in victim_partitions:
        w = worlds[partition]
        await eventually(
            history_becomes(database_url, w, [w.cvm1.id, w.cvm2.id]), timeout=DEADLINE_S, what="taken over"
        )
    took_s = time.monotonic() - killed_at
    print(f"\nreplica killed -> its partitions' next claims committed by the others: {took_s * 1000:.0f} ms")
    assert took_s < TAKEOVER_BOUND_S
    await eventually(lambda: spread_evenly(a, c), timeout=DEADLINE_S, what="three partitions each")
    assert await a.gauge("havip_binding_replicas") == 2

    # The killed replica returns: the others hand it a share back, and it decides from what is committed.
    b2 = start("binding-b")
    await eventually(lambda: spread_evenly(a, b2, c), timeout=DEADLINE_S, what="spread again")
    for w in worlds.values():
        await publisher.publish(w.claim(w.cvm1.mac))
    for w in worlds.values():
        expected = [w.cvm1.id, w.cvm2.id, w.cvm1.id] if _partition_of(worlds, w) in victim_partitions else None
        await eventually(history_becomes(database_url, w, expected), timeout=DEADLINE_S, what="last")
    assert b2.said("partitions taken over: their bindings read") >= 1
    # The inventory came by its own queue, the claims by theirs: none was refused for an instance not yet known.
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM binding.rejected_claims") == 0
    finally:
        await conn.close()


async def test_a_replica_stopped_with_sigterm_hands_its_partitions_over_without_losing_a_claim(
    database_url: str, start: BindingProcessFactory, publisher: Broker
) -> None:
    worlds = worlds_in_partitions(PARTITIONS)
    for w in worlds.values():
        await publisher.publish_many(w.inventory())
    a, b = start("binding-a"), start("binding-b")
    await eventually(lambda: spread_evenly(a, b), timeout=DEADLINE_S, what="three partitions each")
    drained = b.partitions()
    handed_before = b.said("handed partition")
    b.proc.send_signal(signal.SIGTERM)
    for w in worlds.values():  # claims published while it drains: none lost, each decided once
        await publisher.publish(w.claim(w.cvm1.mac))
    assert b.proc.wait(timeout=DEADLINE_S) == 0
    assert b.said("handed partition") - handed_before == len(drained)
    for w in worlds.values():
        await eventually(history_becomes(database_url, w, [w.cvm1.id]), timeout=DEADLINE_S, what="bound")
    await eventually(lambda: spread_evenly(a), timeout=DEADLINE_S, what="every partition on the one left")


async def test_a_frozen_replica_loses_its_partitions_and_after_thawing_writes_nothing_wrong(
    database_url: str, amqp_url: str, start: BindingProcessFactory, publisher: Broker
) -> None:
    """SIGSTOP: no socket closes. Postgres ends the frozen replica's silent session after HAVIP_LEASE_TIMEOUT_S
    (its locks go with it) and RabbitMQ its connection after missed heartbeats (its consumers go with it): the
    other replica decides its partitions. Thawed, it finds its leases gone and stops deciding them; whatever it
    had in hand is refused by the conditional writes."""
    fast = {"HAVIP_LEASE_TIMEOUT_S": "2", "HAVIP_AMQP_URL": str(URL(amqp_url).update_query(heartbeat=2))}
    worlds = worlds_in_partitions(PARTITIONS)
    for w in worlds.values():
        await publisher.publish_many(w.inventory())
    a, b = start("binding-a", fast), start("binding-b", fast)
    await eventually(lambda: spread_evenly(a, b), timeout=DEADLINE_S, what="three partitions each")
    frozen = b.partitions()
    os.killpg(b.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        for partition in frozen:
            w = worlds[partition]
            await publisher.publish(w.claim(w.cvm1.mac))
        for partition in frozen:
            w = worlds[partition]
            await eventually(history_becomes(database_url, w, [w.cvm1.id]), timeout=DEADLINE_S, what="a")
        took_s = time.monotonic() - stopped_at
        print(f"\nreplica frozen -> its partitions' next claims committed by the other: {took_s:.1f} s")
    finally:
        os.killpg(b.proc.pid, signal.SIGCONT)
    await eventually(lambda: spread_evenly(a, b), timeout=DEADLINE_S, what="spread again after the thaw")
    for w in worlds.values():
        await publisher.publish(w.claim(w.cvm2.mac))
    for partition, w in worlds.items():
        first = [w.cvm1.id] if partition in frozen else []
        await eventually(history_becomes(database_url, w, [*first, w.cvm2.id]), timeout=DEADLINE_S, what="b")


async def test_replicas_configured_with_different_partition_counts_say_so(start: BindingProcessFactory) -> None:
    a = start("binding-a", {"HAVIP_PARTITIONS": "4"})
    b = start("binding-b", {"HAVIP_PARTITIONS": "6"})
    await a.running()
    await b.running()
    await eventually(
        lambda: _gauges(a, b, "havip_binding_partition_counts", [2, 2]), timeout=DEADLINE_S, what="disagreement"
    )
    assert await a.gauge("havip_binding_partitions") == 4


async def test_migrate_deletes_the_retired_queue_when_empty_and_keeps_it_while_it_holds_messages(
    database_url: str,
) -> None:
    with temporary_vhost(AMQP_BASE, f"havip-test-upgrade-{os.getpid()}-{time.monotonic_ns()}") as amqp_url:
        for messages, kept in ((3, True), (0, False)):
            connection = await aio_pika.connect(amqp_url)
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(RETIRED_QUEUE, durable=True)
                await queue.purge()
                for n in range(messages):
                    await channel.default_exchange.publish(
                        aio_pika.Message(f"{n}".encode()), routing_key=RETIRED_QUEUE
                    )
            finally:
                await connection.close()
            await migrate(BindingSettings(database_url=database_url, amqp_url=amqp_url))
            connection = await aio_pika.connect(amqp_url)
            try:
                channel = await connection.channel()
                try:
                    left = await channel.declare_queue(RETIRED_QUEUE, passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    assert not kept
                else:
                    assert kept
                    assert left.declaration_result.message_count == messages  # nothing lost
            finally:
                await connection.close()


def _partition_of(worlds: dict[int, World], w: World) -> int:
    return next(p for p, world in worlds.items() if world is w)


def history_becomes(
    database_url: str, w: World, expected: Sequence[object] | None
) -> Callable[[], Awaitable[bool]]:
    """The HAVIP's history is `expected` (its holders, in order); None: contiguous, and ending with cvm1."""

    async def holds() -> bool:
        history = await history_of(database_url, w)
        if expected is None:
            contiguous = [sequence for sequence, _ in history] == list(range(1, len(history) + 1))
            return contiguous and bool(history) and history[-1][1] == w.cvm1.id
        return history == list(enumerate(expected, start=1))

    return holds


async def _gauges(a: BindingProcess, b: BindingProcess, name: str, expected: list[float]) -> bool:
    return [await a.gauge(name), await b.gauge(name)] == expected
