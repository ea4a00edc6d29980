"""Chaos on the clustered engines: a failover storm of real keepalived pairs (tests/e2e/storm.py) with the services
on a three-node RabbitMQ cluster (quorum queues, every process given all three nodes) and a Postgres primary
with a synchronous standby under pg_auto_failover (every process given both nodes, target_session_attrs=read-
write), with three binding replicas and two watchers. One fault at a time, each followed at once by a failover
that must go through it, with failovers while it lasts and after it is mended: the broker node holding most of
the binding's queue leaders killed (kill -9) and started again; a broker node frozen (SIGSTOP) and thawed; the
Postgres primary's whole node killed and started again (the next database fault only once the pair is healthy
again); a binding replica killed; a watcher killed.

Afterwards, as in the replica storm: every HAVIP bound to keepalived's current master (the wire's last
claimant), each failover exactly one transition, the allocator's view equal to the binding's, no claim of a
registered instance refused, the outbox empty, and every transition's event received once per (HAVIP, sequence)
by an event consumer of the test's own on the cluster. The time from each fault to the failover's last commit is
printed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from shared.db import drop_database
from shared.settings import CommonSettings
from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import RabbitCluster
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

pytestmark = pytest.mark.e2e

T = TypeVar("T")

REPLICAS = {"binding": "binding-1", "binding-2": "binding-2", "binding-3": "binding-3"}  # name -> replica id
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # name -> HAVIP_WATCHER_ID
ALLOCATORS = ("allocator",)
AMQP_HEARTBEAT_S = 2  # a frozen broker node is left after about three
LEASE_TIMEOUT_S = 3
STEP_TIMEOUT_S = 30
FAULT_TIMEOUT_S = 90  # a failover committed while an engine's node is away (a Postgres failover: ~10 s)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(SUBNET) as lab:
        for name, ip in HOSTS.items():
            lab.add_host(name, ip)
        lab.add_capture_port("tap1")
        lab.add_capture_port("tap2")
        lab.add_capture_port("wire")
        yield lab


@pytest.fixture(scope="module")
def database(postgres_ha: PostgresHA) -> Iterator[str]:
    """A database of its own on the primary with its standby, dropped at the end."""
    dsn = postgres_ha.dsn(f"havip_chaos_{uuid.uuid4().hex[:8]}")
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(dsn))


@pytest.fixture(scope="module")
def system(
    lab: Lab, database: str, rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    settings = {
        "HAVIP_PARTITIONS": str(PARTITIONS),
        "HAVIP_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
        "HAVIP_AMQP_HEARTBEAT_S": str(AMQP_HEARTBEAT_S),
        "HAVIP_AMQP_PREFIX": f"chaos-{uuid.uuid4().hex[:6]}.",  # the cluster's default vhost, names of its own
    }
    with System(
        database,
        ",".join(rabbit_cluster.urls),
        lab.capture_ports["tap1"].iface,
        tmp_path_factory.mktemp("services"),
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


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in HOSTS}
    return register_inventory(system, "chaos", SUBNET, hosts)


FAILOVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # TargetServerAttributeNotMatched: no node read-write yet
)


class OnThePrimary:
    """The test's own reads of the binding's tables, on whichever node is the primary: a read that finds its
    connection gone (the primary killed) connects again through the multi-host URL and reads again, until a
    deadline."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def _read(self, how: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        deadline = time.monotonic() + FAULT_TIMEOUT_S
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

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


class Faults:
    """The faults of the run, and for each the recovery: from the fault to the last commit of the failover that
    keepalived starts at once after it (the first failover that must go through the fault's consequences)."""

    def __init__(self, storm: Storm) -> None:
        self.storm = storm
        self.recovery_s: dict[str, float] = {}

    async def then_failover(self, name: str, fault: Callable[[], object]) -> None:
        at = time.time()
        await asyncio.to_thread(fault)
        await self.storm.fail_over(name)
        last = await self.storm.db.fetchval(
            "SELECT extract(epoch FROM max(committed_at)) FROM binding.transitions"
        )
        self.recovery_s[name] = round(float(last) - at, 3)
        print(f"{name}: the next failover's last commit {self.recovery_s[name]} s after the fault")


def cluster_whole(cluster: RabbitCluster) -> bool:
    """The three nodes running in one cluster (False while no node answers the question)."""
    try:
        return len(cluster.running_nodes()) == 3
    except Exception:
        return False


def busiest_leader(cluster: RabbitCluster, prefix: str) -> int:
    """The broker node leading most of the binding's partition queues."""
    leaders = [cluster.leader_of(f"{prefix}binding.partition.{p}") for p in range(PARTITIONS)]
    return max(set(leaders), key=leaders.count)


async def test_a_failover_storm_survives_each_engine_node_killed_or_frozen(
    lab: Lab,
    system: System,
    inventory: dict[str, Any],
    database: str,
    postgres_ha: PostgresHA,
    rabbit_cluster: RabbitCluster,
) -> None:
    instances = {name: inventory["instances"][name]["id"] for name in HOSTS}
    havips = allocate_havips(system, inventory, instances, ALLOCATORS)
    prefix = system.settings["HAVIP_AMQP_PREFIX"]
    settings = CommonSettings(amqp_url=system.amqp_url, amqp_prefix=prefix, partitions=PARTITIONS)
    db = OnThePrimary(database)
    try:
        await eventually(lambda: known_to_the_binding(db, havips), timeout=STEP_TIMEOUT_S, what="the inventory")
        storm = Storm(lab, db, havips, step_timeout_s=FAULT_TIMEOUT_S)
        faults = Faults(storm)
        wire = ArpCapture(lab.capture_ports["wire"].iface, bpf="arp", count=1_000_000, registry=lab.processes)
        async with listening_through_failovers(settings, ["havip.binding.changed"]) as events:
            try:
                with wire:
                    await storm.start()
                    await storm.fail_over("everything running")
                    await break_each_engine(storm, faults, system, postgres_ha, rabbit_cluster)
                claimants = wire_claimants(wire.frames, ADDRESSES)
                await check_the_outcome(
                    storm,
                    system,
                    db,
                    events,
                    instances,
                    claimants,
                    allocators=ALLOCATORS,
                    watcher_ids=set(WATCHERS.values()),
                )
            finally:
                storm.close()
        print("recovery, fault -> the failover's last commit:", faults.recovery_s)
    finally:
        await db.close()


async def break_each_engine(
    storm: Storm, faults: Faults, system: System, postgres: PostgresHA, rabbit: RabbitCluster
) -> None:
    """One fault at a time, each mended before the next."""
    prefix = system.settings["HAVIP_AMQP_PREFIX"]

    # 1. The broker node leading most partition queues killed: its queues elect new leaders on the others, every
    # process connected to it moves to another node.
    node = busiest_leader(rabbit, prefix)
    await faults.then_failover(f"broker node {node} killed", lambda: rabbit.kill(node))
    await storm.fail_over(f"broker node {node} dead")
    await asyncio.to_thread(rabbit.restart, node)
    await eventually(
        lambda: asyncio.to_thread(cluster_whole, rabbit),
        timeout=FAULT_TIMEOUT_S,
        interval=1.0,
        what="the killed node back in the cluster",
    )
    await storm.fail_over(f"broker node {node} back")

    # 2. A broker node frozen: its peers and its clients notice only after net_ticktime and missed heartbeats.
    node = busiest_leader(rabbit, prefix)
    await faults.then_failover(f"broker node {node} frozen", lambda: rabbit.freeze(node))
    await storm.fail_over(f"broker node {node} still frozen")
    # Thawed after more than net_ticktime, a node stays cut off from the others (RabbitMQ's partition handling
    # `ignore`): it is restarted, as an operator would.
    await asyncio.to_thread(rabbit.thaw, node)
    await asyncio.to_thread(rabbit.restart, node)
    await eventually(
        lambda: asyncio.to_thread(cluster_whole, rabbit),
        timeout=FAULT_TIMEOUT_S,
        interval=1.0,
        what="the thawed node back in the cluster",
    )
    await storm.fail_over(f"broker node {node} thawed")

    # 3. The Postgres primary's whole node killed: pg_auto_failover promotes the standby; every process reconnects
    # to it through its multi-host URL. The test's own connection goes with the old primary.
    primary = postgres.primary()
    assert primary is not None
    await faults.then_failover(f"Postgres primary {primary} killed", lambda: postgres.kill_node(primary))
    await storm.fail_over("Postgres on the promoted standby")
    await asyncio.to_thread(postgres.restart_node, primary)
    await asyncio.to_thread(postgres.wait_healthy)
    await storm.fail_over("Postgres with its standby again")

    # 4. A binding replica killed, and 5. a watcher killed, on the clustered engines.
    await faults.then_failover("a binding replica killed", lambda: system.kill("binding-2"))
    system.start_service("binding-2")
    await storm.fail_over("the killed replica back")
    await faults.then_failover("a watcher killed", lambda: system.kill("twin"))
    system.start_service("twin")
    await asyncio.to_thread(system.wait_ready, names=("twin",))
    await storm.fail_over("the killed watcher back")
