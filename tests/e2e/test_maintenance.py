"""Planned maintenance of the clustered engines under a failover storm of real keepalived pairs
(tests/e2e/clustered.py), each step as docs/operations.md describes it: a Postgres switchover while a failover
is under way; a RabbitMQ node drained (`rabbitmq-upgrade drain`: its queue leaders moved away, its clients sent
to the other nodes), restarted and revived; a rolling restart of the three broker nodes, one at a time, each only
once every quorum queue has a majority plus one member online again. Afterwards no transition lost or duplicated:
every HAVIP bound to keepalived's master, each failover exactly one transition, one event per (HAVIP, sequence),
the allocator's view equal to the binding's, the outbox empty."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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
    with database_of_its_own(postgres_ha, "maintenance") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def system(
    lab: Lab, database: str, rabbit_cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with services_on_the_clusters(lab, database, rabbit_cluster, tmp_path_factory.mktemp("services")) as system:
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    return storm_inventory(system, lab, "maintenance")


async def test_planned_maintenance_of_both_engines_loses_and_duplicates_nothing(
    lab: Lab,
    system: System,
    inventory: dict[str, Any],
    database: str,
    postgres_ha: PostgresHA,
    rabbit_cluster: RabbitCluster,
) -> None:
    async with the_storm(lab, system, inventory, database) as storm:
        await switch_postgres_over(storm, postgres_ha)
        await drain_a_broker_node(storm, system, rabbit_cluster)
        await restart_the_broker_cluster(storm, rabbit_cluster)


async def switch_postgres_over(storm: Storm, postgres: PostgresHA) -> None:
    """`pg_autoctl perform switchover` while the masters hand their addresses over."""
    before = postgres.primary()
    switching = asyncio.create_task(asyncio.to_thread(postgres.switchover))
    try:
        await storm.fail_over("a Postgres switchover under way")
    finally:
        after = await switching
    assert after != before
    await storm.fail_over("after the switchover")


async def drain_one(storm: Storm, rabbit: RabbitCluster, node: int, during: str) -> None:
    """Drained (its leaders and clients moved to the others) while a failover goes on, restarted, revived."""
    await asyncio.to_thread(rabbit.queues, node, "check_if_node_is_quorum_critical")  # the others hold a majority
    draining = asyncio.create_task(asyncio.to_thread(rabbit.upgrade, node, "drain"))
    try:
        await storm.fail_over(during)
    finally:
        await draining
    await asyncio.to_thread(rabbit.restart, node)
    await asyncio.to_thread(rabbit.upgrade, node, "revive")
    await until_cluster_whole(rabbit, f"node {node} back in the cluster")
    await asyncio.to_thread(rabbit.upgrade, node, "await_online_quorum_plus_one")


async def drain_a_broker_node(storm: Storm, system: System, rabbit: RabbitCluster) -> None:
    node = busiest_leader(rabbit, system)
    await drain_one(storm, rabbit, node, f"broker node {node} draining")
    await storm.fail_over(f"broker node {node} revived")


async def restart_the_broker_cluster(storm: Storm, rabbit: RabbitCluster) -> None:
    for node in (1, 2, 3):
        await drain_one(storm, rabbit, node, f"rolling restart: node {node} draining")
    await storm.fail_over("after the rolling restart")
