"""The failover storm on the clustered engines (a three-node RabbitMQ cluster and a Postgres primary with its
synchronous standby, tests/clusters), for the end-to-end tests that break or maintain them under it: the lab, a
database of its own, the services as processes given every node, and `run_storm`, which runs the storm around a
test's own steps and checks its outcome (tests/e2e/storm.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from shared.db import drop_database
from shared.settings import CommonSettings
from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import NODES, RabbitCluster
from tests.e2e.storm import (
    ADDRESSES,
    HOSTS,
    PARTITIONS,
    SUBNET,
    Storm,
    allocate_havips,
    check_the_outcome,
    known_to_the_binding,
    wire_claimants,
)
from tests.e2e.system import System, register_inventory
from tests.lab import ArpCapture, Lab
from tests.listener import listening_through_failovers
from tests.ports import free_port
from tests.waiting import eventually

T = TypeVar("T")

REPLICAS = {"binding": "binding-1", "binding-2": "binding-2", "binding-3": "binding-3"}  # name -> replica id
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # name -> HAVIP_WATCHER_ID
ALLOCATORS = ("allocator",)
LEASE_TIMEOUT_S = 3
STEP_TIMEOUT_S = 30
FAULT_TIMEOUT_S = 90  # a failover committed while an engine's node is away (a Postgres failover: ~10 s)


@contextlib.contextmanager
def storm_lab() -> Iterator[Lab]:
    """The storm's four servers, two watchers' taps and the test's own reference tap."""
    with Lab(SUBNET) as lab:
        for name, ip in HOSTS.items():
            lab.add_host(name, ip)
        lab.add_capture_port("tap1")
        lab.add_capture_port("tap2")
        lab.add_capture_port("wire")
        yield lab


@contextlib.contextmanager
def database_of_its_own(postgres: PostgresHA, label: str) -> Iterator[str]:
    """A database of its own on the primary with its standby (created by the services' `migrate`), dropped at
    the end."""
    dsn = postgres.dsn(f"havip_{label}_{uuid.uuid4().hex[:8]}")
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(dsn))


@contextlib.contextmanager
def services_on_the_clusters(lab: Lab, database: str, rabbit: RabbitCluster, workdir: Path) -> Iterator[System]:
    """Three binding replicas, two watchers and an allocator, every process given the three broker nodes and both
    Postgres nodes, on the cluster's default vhost under names of their own — over TLS where the cluster listens
    for it (amqps://, each node verified against its CA; the database URL says the same of Postgres)."""
    settings = {
        "HAVIP_PARTITIONS": str(PARTITIONS),
        "HAVIP_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
        "HAVIP_AMQP_PREFIX": f"storm-{uuid.uuid4().hex[:6]}.",
    }
    if rabbit.tls_urls and rabbit.ca_file is not None:
        settings["HAVIP_AMQP_CA_FILE"] = str(rabbit.ca_file)
    with System(
        database,
        ",".join(rabbit.tls_urls or rabbit.urls),
        lab.capture_ports["tap1"].iface,
        workdir,
        watcher_id=WATCHERS["arp_watcher"],
        binding_replica_id=REPLICAS["binding"],
        settings=settings,
    ) as system:
        for name, replica_id in REPLICAS.items():
            if name != "binding":
                system.start_binding(name, free_port(), replica_id=replica_id)
        system.start_watcher("twin", lab.capture_ports["tap2"].iface, free_port(), watcher_id=WATCHERS["twin"])
        system.wait_ready(timeout=120)
        yield system


def storm_inventory(system: System, lab: Lab, name: str) -> dict[str, Any]:
    hosts = {host: (lab.hosts[host].ip, lab.hosts[host].mac) for host in HOSTS}
    return register_inventory(system, name, SUBNET, hosts)


FAILOVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # TargetServerAttributeNotMatched: no node read-write yet
)


class OnThePrimary:
    """The test's own reads of the binding's tables, on whichever node is the primary: a read that finds its
    connection gone (the primary killed, or switched over) connects again through the multi-host URL and reads
    again, until a deadline."""

    def __init__(self, dsn: str, *, timeout_s: float = FAULT_TIMEOUT_S) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._conn: asyncpg.Connection | None = None

    async def _read(self, how: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self._dsn, timeout=5)
                return await how(self._conn)
            except FAILOVER_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await self.close()
                await asyncio.sleep(0.2)  # pacing the reconnects while the standby is promoted

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self._read(lambda conn: conn.fetch(query, *args))

    async def fetchval(self, query: str, *args: object) -> Any:
        return await self._read(lambda conn: conn.fetchval(query, *args))

    async def connection(self) -> asyncpg.Connection:
        """The connection itself, once it answers, for checks that take one."""

        async def connected(conn: asyncpg.Connection) -> asyncpg.Connection:
            await conn.fetchval("SELECT 1")
            return conn

        return await self._read(connected)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def cluster_whole(cluster: RabbitCluster) -> bool:
    """The three nodes running in one cluster, as each of them sees it, and every quorum queue with all its
    replicas online — a node back in the cluster whose queue replicas are still starting cannot yet stand in for
    the next node to fail (False while a node does not answer the question)."""
    try:
        every_node_sees_three = all(len(cluster.running_nodes(via=n)) == 3 for n in NODES)
        return every_node_sees_three and not cluster.queues_short_of_replicas()
    except Exception:
        return False


async def until_cluster_whole(cluster: RabbitCluster, what: str) -> None:
    await eventually(
        lambda: asyncio.to_thread(cluster_whole, cluster), timeout=FAULT_TIMEOUT_S, interval=1.0, what=what
    )


def busiest_leader(cluster: RabbitCluster, system: System) -> int:
    """The broker node leading most of the binding's partition queues."""
    prefix = system.settings["HAVIP_AMQP_PREFIX"]
    leaders = [cluster.leader_of(f"{prefix}binding.partition.{p}") for p in range(PARTITIONS)]
    return max(set(leaders), key=leaders.count)


@contextlib.asynccontextmanager
async def the_storm(lab: Lab, system: System, inventory: dict[str, Any], database: str) -> AsyncIterator[Storm]:
    """The storm started (every HAVIP bound to its first master, one failover with everything running) for the
    test's own steps; afterwards its outcome is checked (tests/e2e/storm.py `check_the_outcome`)."""
    instances = {name: inventory["instances"][name]["id"] for name in HOSTS}
    havips = allocate_havips(system, inventory, instances, ALLOCATORS)
    prefix = system.settings["HAVIP_AMQP_PREFIX"]
    ca_file = system.settings.get("HAVIP_AMQP_CA_FILE")
    settings = CommonSettings(
        amqp_url=system.amqp_url,
        amqp_ca_file=Path(ca_file) if ca_file else None,
        amqp_prefix=prefix,
        partitions=PARTITIONS,
    )
    db = OnThePrimary(database)
    try:
        await eventually(lambda: known_to_the_binding(db, havips), timeout=STEP_TIMEOUT_S, what="the inventory")
        storm = Storm(lab, db, havips, step_timeout_s=FAULT_TIMEOUT_S)
        wire = ArpCapture(lab.capture_ports["wire"].iface, bpf="arp", count=1_000_000, registry=lab.processes)
        async with listening_through_failovers(settings, ["havip.binding.changed"]) as events:
            try:
                with wire:
                    await storm.start()
                    await storm.fail_over("everything running")
                    yield storm
                await check_the_outcome(
                    storm,
                    system,
                    db,
                    events,
                    instances,
                    wire_claimants(wire.frames, ADDRESSES),
                    allocators=ALLOCATORS,
                    watcher_ids=set(WATCHERS.values()),
                )
            finally:
                # keepalived's instances stopped one by one, seconds in all: off the loop, which keeps the
                # listener's AMQP heartbeats going meanwhile (RabbitMQ drops a client silent for two of them).
                await asyncio.to_thread(storm.close)
    finally:
        await db.close()
