"""Chaos on the clustered engines: a failover storm of real keepalived pairs (tests/e2e/storm.py) with the services
on a three-node RabbitMQ cluster (quorum queues, every process given all three nodes) and a Postgres primary
with a synchronous standby under pg_auto_failover (every process given both nodes, target_session_attrs=read-
write), every link over TLS (amqps://, sslmode=verify-full, a CA made for the session), with three binding
replicas and two watchers. One fault at a time, each followed at once by a failover
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
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import RabbitCluster
from tests.e2e.clustered import (
    busiest_leader,
    database_of_its_own,
    services_on_the_clusters,
    storm_inventory,
    storm_lab,
    the_storm,
    until_cluster_whole,
)
from tests.e2e.storm import Storm
from tests.e2e.system import System
from tests.lab import Lab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with storm_lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def database(postgres_ha: PostgresHA) -> Iterator[str]:
    with database_of_its_own(postgres_ha, "chaos") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def system(
    lab: Lab, database: str, rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with services_on_the_clusters(lab, database, rabbit_cluster, tmp_path_factory.mktemp("services")) as system:
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    return storm_inventory(system, lab, "chaos")


class Faults:
    """The faults of the run, and for each the recovery: from the fault to the last commit of the failover that
    keepalived starts at once after it (the first failover that must go through the fault's consequences)."""

    def __init__(self, storm: Storm, rabbit: RabbitCluster) -> None:
        self.storm = storm
        self.rabbit = rabbit
        self.recovery_s: dict[str, float] = {}

    async def then_failover(self, name: str, fault: Callable[[], object]) -> None:
        at = time.time()
        await asyncio.to_thread(fault)
        try:
            await self.storm.fail_over(name)
        except TimeoutError:
            print(f"{name}: stalled; the broker {time.time() - at:.1f} s after the fault:")
            print(await asyncio.to_thread(self.rabbit.describe))
            raise
        last = await self.storm.db.fetchval(
            "SELECT extract(epoch FROM max(committed_at)) FROM binding.transitions"
        )
        self.recovery_s[name] = round(float(last) - at, 3)
        print(f"{name}: the next failover's last commit {self.recovery_s[name]} s after the fault")


async def test_a_failover_storm_survives_each_engine_node_killed_or_frozen(
    lab: Lab,
    system: System,
    inventory: dict[str, Any],
    database: str,
    postgres_ha: PostgresHA,
    rabbit_cluster: RabbitCluster,
) -> None:
    async with the_storm(lab, system, inventory, database) as storm:
        faults = Faults(storm, rabbit_cluster)
        await break_each_engine(storm, faults, system, postgres_ha, rabbit_cluster)
    print("recovery, fault -> the next failover's last commit:", faults.recovery_s)


async def break_each_engine(
    storm: Storm, faults: Faults, system: System, postgres: PostgresHA, rabbit: RabbitCluster
) -> None:
    """One fault at a time, each mended before the next."""
    # 1. The broker node leading most partition queues killed: its queues elect new leaders on the others, every
    # process connected to it moves to another node.
    node = busiest_leader(rabbit, system)
    await faults.then_failover(f"broker node {node} killed", lambda: rabbit.kill(node))
    await storm.fail_over(f"broker node {node} dead")
    await asyncio.to_thread(rabbit.restart, node)
    await until_cluster_whole(rabbit, "the killed node back in the cluster")
    await storm.fail_over(f"broker node {node} back")

    # 2. A broker node frozen: its peers and its clients notice only after net_ticktime and missed heartbeats.
    node = busiest_leader(rabbit, system)
    await faults.then_failover(f"broker node {node} frozen", lambda: rabbit.freeze(node))
    await storm.fail_over(f"broker node {node} still frozen")
    # Thawed after more than net_ticktime, a node stays cut off from the others (pause_minority does not pause
    # it: it reaches its peers at once and counts a majority): it is restarted, as an operator would.
    await asyncio.to_thread(rabbit.thaw, node)
    await asyncio.to_thread(rabbit.restart, node)
    await until_cluster_whole(rabbit, "the thawed node back in the cluster")
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
