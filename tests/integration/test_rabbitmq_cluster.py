"""The three-node RabbitMQ cluster of the tests (scripts/rabbitmq-cluster.sh, tests/clusters) keeps a quorum queue
with a single active consumer going when the node holding the queue's leader is killed (SIGKILL): publishing goes
on through a fresh connection to another node, the waiting consumer on another node takes over, every confirmed
message is delivered, and the killed node comes back into the cluster.

Plain aio-pika connections, one URL each: a client that knows several nodes is the product's business, not this
test's."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import FieldTable

from tests.clusters.rabbitmq import NODES, RabbitCluster
from tests.conftest import RUN_ID
from tests.waiting import eventually

log = logging.getLogger(__name__)

DEADLINE_S = 60.0
CONFIRM_TIMEOUT_S = 10.0
PREFETCH = 50
# Confirmed before the kill, and confirmed after it through the fresh connection.
BEFORE, AFTER = 300, 300
# What the test demands; the figures printed are what it took (about 0.2 s for each here).
PUBLISH_RESUMED_BOUND_S = 15.0
TAKEOVER_BOUND_S = 15.0

SAC_QUORUM_QUEUE: FieldTable = {"x-queue-type": "quorum", "x-single-active-consumer": True}


@dataclass
class Consumer:
    """Records every delivery (sequence number, arrival time) and acknowledges it."""

    deliveries: list[tuple[int, float]] = field(default_factory=list)
    failed_acks: int = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.deliveries.append((int(message.body), time.monotonic()))
        try:
            await message.ack()
        except Exception:  # its node is gone: the broker delivers the message again, to the other consumer
            self.failed_acks += 1

    def seen(self) -> set[int]:
        return {seq for seq, _ in self.deliveries}

    def first_at(self) -> float | None:
        return min((at for _, at in self.deliveries), default=None)


@dataclass
class Publisher:
    """Publishes 0, 1, 2, … one after the other, each awaiting its confirm. Once the channel fails (its node was
    killed), the same message and the next ones are published through a fresh connection to `fallback_url`."""

    queue: str
    channel: AbstractChannel
    fallback_url: str
    confirmed: dict[int, float] = field(default_factory=dict)  # sequence number -> when it was confirmed
    failures: list[str] = field(default_factory=list)
    fresh: AbstractConnection | None = None
    fresh_from: int | None = None  # the first sequence number published through the fresh connection
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            try:
                await self.channel.default_exchange.publish(
                    aio_pika.Message(str(seq).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=self.queue,
                    timeout=CONFIRM_TIMEOUT_S,
                )
            except Exception as exc:
                self.failures.append(f"{seq}: {type(exc).__name__}: {exc}")
                await self._next_channel(seq)
                continue
            self.confirmed[seq] = time.monotonic()
            seq += 1
            await asyncio.sleep(0.002)  # pacing: a few hundred messages a second

    async def _next_channel(self, seq: int) -> None:
        """The fresh connection at the first failure; a new channel on it at each later one. RabbitMQ 3.10 nacks
        every publish of a channel whose first publish to the quorum queue came while the queue's new leader was
        being elected, until the channel is closed; a new channel's publishes are confirmed."""
        if self.fresh is None:
            self.fresh_from = seq
            self.fresh = await aio_pika.connect(self.fallback_url, timeout=CONFIRM_TIMEOUT_S)
        else:
            await asyncio.sleep(0.05)  # back-off between two tries
            with contextlib.suppress(Exception):
                await self.channel.close()
        self.channel = await self.fresh.channel(publisher_confirms=True)

    def confirmed_through_fresh(self) -> int:
        return 0 if self.fresh_from is None else len(self.confirmed) - self.fresh_from

    def longest_gap(self) -> float:
        """The longest time between two consecutive confirms."""
        times = sorted(self.confirmed.values())
        return max(b - a for a, b in itertools.pairwise(times))


async def test_a_quorum_queue_goes_on_when_the_node_of_its_leader_is_killed(rabbit_cluster: RabbitCluster) -> None:
    cluster = rabbit_cluster
    queue_name = f"havip-test-{RUN_ID}-{uuid.uuid4().hex[:6]}-sac"
    connections: list[AbstractConnection] = []

    async def connect(n: int) -> AbstractChannel:
        connection = await aio_pika.connect(cluster.urls[n - 1], timeout=CONFIRM_TIMEOUT_S)
        connections.append(connection)
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=PREFETCH)
        return channel

    async def declare(channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(queue_name, durable=True, arguments=SAC_QUORUM_QUEUE)

    publisher: Publisher | None = None
    publishing: asyncio.Task[None] | None = None
    killed: int | None = None  # a node killed and not back yet
    try:
        await declare(await connect(1))
        leader = await asyncio.to_thread(cluster.leader_of, queue_name)
        replicas = await asyncio.to_thread(cluster.replicas, queue_name)
        assert replicas.members == replicas.online == NODES
        survivor, standby_node = (n for n in NODES if n != leader)

        # Everything on the leader's node: the publisher and the active consumer. The standby waits on another.
        doomed = await connect(leader)
        active, standby = Consumer(), Consumer()
        await (await declare(doomed)).consume(active.on_message)
        await (await declare(await connect(standby_node))).consume(standby.on_message)
        publisher = Publisher(queue_name, doomed, cluster.urls[survivor - 1])
        publishing = asyncio.create_task(publisher.run())

        def under_way() -> bool:
            return len(publisher.confirmed) >= BEFORE and len(active.deliveries) >= BEFORE // 3

        await eventually(under_way, timeout=DEADLINE_S, interval=0.05, what=f"{BEFORE} confirmed, consumed")
        assert not standby.deliveries, "the standby consumer got messages while the active one was there"

        killed, killed_at = leader, time.monotonic()
        await asyncio.to_thread(cluster.kill, killed)

        def resumed() -> bool:
            if publishing.done():
                publishing.result()  # the publisher's own failure ends the wait
            return publisher.confirmed_through_fresh() >= AFTER and bool(standby.deliveries)

        await eventually(resumed, timeout=DEADLINE_S, interval=0.05, what="publishing and consuming resumed")
        publisher.stop.set()
        await asyncio.wait_for(publishing, CONFIRM_TIMEOUT_S * 2)

        confirmed = set(publisher.confirmed)
        await eventually(
            lambda: confirmed <= active.seen() | standby.seen(),
            timeout=DEADLINE_S, interval=0.05, what="every confirmed message delivered",
        )  # fmt: skip
        assert publisher.fresh_from is not None
        publish_resumed_s = publisher.confirmed[publisher.fresh_from] - killed_at
        takeover_at = standby.first_at()
        assert takeover_at is not None
        assert takeover_at > killed_at
        takeover_s = takeover_at - killed_at
        new_leader = await asyncio.to_thread(cluster.leader_of, queue_name)
        assert new_leader != leader

        restart_began = time.monotonic()
        await asyncio.to_thread(cluster.restart, killed)
        restarted_s = time.monotonic() - restart_began

        async def all_back() -> bool:
            running = await asyncio.to_thread(cluster.running_nodes)
            replicas = await asyncio.to_thread(cluster.replicas, queue_name)
            return running == list(NODES) and replicas.online == NODES

        await eventually(all_back, timeout=DEADLINE_S, interval=0.5, what="three nodes and three replicas")
        killed = None

        deliveries = active.deliveries + standby.deliveries
        delivered_again = len(deliveries) - len({seq for seq, _ in deliveries})
        print(f"\nthree-node cluster started in {cluster.started_in_s:.1f} s")
        print(
            f"kill -9 of node {leader} (queue leader, publisher, active consumer): first confirm through a fresh "
            f"connection to node {survivor} {publish_resumed_s * 1000:.0f} ms after the kill (longest gap between "
            f"confirms {publisher.longest_gap() * 1000:.0f} ms; {len(publisher.failures)} publishes failed and "
            f"were repeated), standby consumer on node {standby_node} active after {takeover_s * 1000:.0f} ms, "
            f"new leader on node {new_leader}"
        )
        print(
            f"{len(confirmed)} confirmed, 0 lost, {delivered_again} delivered again ({active.failed_acks} acks "
            f"lost with the node); node {leader} back in the cluster {restarted_s:.1f} s after its restart began"
        )
        assert publish_resumed_s < PUBLISH_RESUMED_BOUND_S
        assert takeover_s < TAKEOVER_BOUND_S
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
            with contextlib.suppress(BaseException):
                await publishing
        if publisher is not None and publisher.fresh is not None:
            connections.append(publisher.fresh)
        if killed is not None:
            await asyncio.to_thread(cluster.restart, killed)  # the cluster is the session's: left whole
        await delete_queue(cluster, queue_name)
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.close()


async def delete_queue(cluster: RabbitCluster, name: str) -> None:
    for n in NODES:
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(cluster.urls[n - 1], timeout=CONFIRM_TIMEOUT_S)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(name)
                return
    log.warning("queue %s could not be deleted", name)
