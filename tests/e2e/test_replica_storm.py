"""A failover storm with every tier redundant and each kind of replica taken away (docs/contract.md#reliability:
R3 with binding replicas, two watchers on a segment and allocator replicas; #partitions, #order): three binding
replicas, two ARP watchers on two taps of the lab's bridge and two allocators, beside two keepalived pairs, each
pair with two VRRP instances of two HAVIPs — one HAVIP in each of the 8 partitions. keepalived fails over again
and again, and one process at a time is taken away as a failover's gratuitous ARPs go out, with failovers while it
is away and after it is back: a binding replica killed (SIGKILL), the watcher the binding relied on killed, an
allocator killed (the API answers through the other meanwhile), the binding replica deciding most partitions
frozen (SIGSTOP: its leases expire and RabbitMQ drops its consumers; two failovers and the new holders' renewals
wait in its partitions' queues until another replica takes them over; then SIGCONT), and a binding replica drained
(SIGTERM: it hands its partitions over and publishes what it committed).

Afterwards every HAVIP is bound to keepalived's current master — the last authorised claimant on the wire, as a
capture of the test's own saw it — and each failover is exactly one transition: every history runs 1..n without
gap or repeat, its holders alternating exactly as the wire's claimants did, each from the one before; the
allocators' view has the same histories; no claim of a registered instance was refused; every transition's
`havip.binding.changed` was published, and no two events with different ids carry one HAVIP's sequence."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from yarl import URL

from shared.settings import CommonSettings
from tests.e2e.storm import (
    ADDRESSES,
    HOSTS,
    PARTITIONS,
    STEP_TIMEOUT_S,
    SUBNET,
    Storm,
    allocate_havips,
    check_the_outcome,
    known_to_the_binding,
    shows,
    wire_claimants,
)
from tests.e2e.system import System, register_inventory
from tests.lab import ArpCapture, Lab
from tests.listener import listening
from tests.ports import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

REPLICAS = {"binding": "binding-1", "binding-2": "binding-2", "binding-3": "binding-3"}  # name -> replica id
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # name -> HAVIP_WATCHER_ID
ALLOCATORS = ("allocator", "allocator-2")
LEASE_TIMEOUT_S = 2  # a frozen replica loses its partitions this soon...
AMQP_HEARTBEAT_S = 2  # ...and RabbitMQ its consumers soon after


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(SUBNET) as lab:
        for name, ip in HOSTS.items():
            lab.add_host(name, ip)
        lab.add_capture_port("tap1")  # the watchers'
        lab.add_capture_port("tap2")
        lab.add_capture_port("wire")  # the test's own reference capture
        yield lab


@pytest.fixture(scope="module")
def system(
    lab: Lab, database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """Three binding replicas, two watchers, two allocators. The replicas lose a frozen peer's partitions fast:
    a short lease (Postgres ends a silent lease session) and a short AMQP heartbeat (RabbitMQ closes a silent
    connection, and the frozen consumer's deliveries with it)."""
    settings = {"HAVIP_PARTITIONS": str(PARTITIONS), "HAVIP_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S)}
    binding_amqp_url = str(URL(amqp_url).update_query(heartbeat=AMQP_HEARTBEAT_S))
    with System(
        database_url,
        amqp_url,
        lab.capture_ports["tap1"].iface,
        tmp_path_factory.mktemp("services"),
        watcher_id=WATCHERS["arp_watcher"],
        binding_replica_id=REPLICAS["binding"],
        binding_amqp_url=binding_amqp_url,
        settings=settings,
    ) as system:
        for name, replica_id in REPLICAS.items():
            if name != "binding":
                system.start_binding(name, free_port(), replica_id=replica_id)
        system.start_watcher("twin", lab.capture_ports["tap2"].iface, free_port(), watcher_id=WATCHERS["twin"])
        system.start_allocator("allocator-2", free_port())
        system.wait_ready()
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in HOSTS}
    return register_inventory(system, "replica-storm", SUBNET, hosts)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


def owned(system: System, name: str) -> int | None:
    """The partitions a binding replica decides now (havip_binding_partitions_owned), None if it does not
    answer."""
    try:
        return int(system.metric("havip_binding_partitions_owned", service=name))
    except httpx.HTTPError:
        return None


def shares(system: System) -> dict[str, int | None]:
    return {name: owned(system, name) for name in REPLICAS if system.services[name].running}


async def shared_evenly(system: System) -> None:
    """Until the three replicas decide every partition between them, each ⌊8/3⌋ or ⌈8/3⌉ of them."""

    def even() -> bool:
        found = shares(system)
        counts = [n for n in found.values() if n is not None]
        return len(counts) == len(REPLICAS) and sum(counts) == PARTITIONS and all(2 <= n <= 3 for n in counts)

    await eventually(
        even, timeout=STEP_TIMEOUT_S, interval=0.1, what="the partitions shared by the three replicas"
    )


def the_busiest(system: System) -> str:
    found = shares(system)
    return max(sorted(found), key=lambda name: found[name] or 0)


async def last_deciding_watcher(db: asyncpg.Connection) -> str:
    """The watcher whose claims decided most of the newest transitions of the HAVIPs: the one relied on."""
    rows = await db.fetch(
        """SELECT DISTINCT ON (havip_id) watcher_id FROM binding.transitions ORDER BY havip_id, sequence DESC"""
    )
    leader, _ = Counter(r["watcher_id"] for r in rows).most_common(1)[0]
    return next(name for name, watcher_id in WATCHERS.items() if watcher_id == leader)


async def test_a_failover_storm_loses_and_duplicates_nothing_whichever_replica_is_taken_away(
    lab: Lab, system: System, inventory: dict[str, Any], db: asyncpg.Connection
) -> None:
    instances = {name: inventory["instances"][name]["id"] for name in HOSTS}
    havips = allocate_havips(system, inventory, instances, ALLOCATORS)  # either allocator answers
    await eventually(
        lambda: known_to_the_binding(db, havips),
        timeout=STEP_TIMEOUT_S,
        what="the HAVIPs in the binding's inventory",
    )
    await shared_evenly(system)

    storm = Storm(lab, db, havips)
    settings = CommonSettings(amqp_url=system.amqp_url, partitions=PARTITIONS)
    wire = ArpCapture(lab.capture_ports["wire"].iface, bpf="arp", count=1_000_000, registry=lab.processes)
    async with listening(settings, ["havip.binding.changed"]) as events:
        try:
            with wire:
                await storm.start()
                await storm.fail_over("everything running")
                await take_each_away(storm, system, db, instances)
            # keepalived keeps running (the masters' refreshes are renewals): the outcome is checked as it stands.
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
            await asyncio.to_thread(storm.close)  # off the loop: the listener's AMQP heartbeats go on meanwhile


async def take_each_away(storm: Storm, system: System, db: asyncpg.Connection, instances: dict[str, str]) -> None:
    """One process at a time taken away in the middle of a failover (as its gratuitous ARPs go out) and brought
    back, with failovers while it is away and after it is back."""
    # 1. A binding replica killed, and started again.
    await shared_evenly(system)
    assert (owned(system, "binding") or 0) >= 2
    await storm.fail_over("a binding replica killed", lambda: system.kill("binding"))
    await storm.fail_over("a binding replica dead")
    system.start_service("binding")
    await shared_evenly(system)
    await storm.fail_over("the killed replica back")

    # 2. The watcher whose claims decided the last failover killed; its twin goes on alone.
    watcher = await last_deciding_watcher(db)
    await storm.fail_over("a watcher killed", lambda: system.kill(watcher))
    await storm.fail_over("a watcher dead")
    system.start_service(watcher)
    await asyncio.to_thread(system.wait_ready, names=(watcher,))
    await storm.fail_over("the killed watcher back")

    # 3. An allocator killed: the other answers, and shows every failover meanwhile.
    await storm.fail_over("an allocator killed", lambda: system.kill("allocator"))
    await storm.fail_over("an allocator dead")
    expected = storm.expected_bindings(instances)
    await eventually(
        shows(system, "allocator-2", storm.havips, expected),
        timeout=STEP_TIMEOUT_S,
        what="the other allocator showing the new holders",
    )
    system.start_service("allocator")
    await asyncio.to_thread(system.wait_ready, names=("allocator",))
    await storm.fail_over("the killed allocator back")

    # 4. The replica deciding most partitions frozen: its leases expire and RabbitMQ drops its consumers, the
    # others take its partitions over; thawed, it finds them gone. Two failovers, and the new holders' renewals,
    # wait meanwhile in its partitions' queues: taken over, they are decided in the order they came.
    await shared_evenly(system)
    frozen = the_busiest(system)
    system.freeze(frozen)
    try:
        await storm.fail_over("the busiest replica frozen", committed=False)
        await storm.fail_over("the busiest replica still frozen")
    finally:
        system.thaw(frozen)
    await shared_evenly(system)
    await storm.fail_over("the frozen replica thawed")

    # 5. The replica deciding most partitions drained with SIGTERM as a failover happens (it hands its partitions
    # over and publishes what it committed), then started again.
    drained = the_busiest(system)
    await storm.fail_over("a binding replica drained", lambda: system.signal(drained, signal.SIGTERM))
    assert await asyncio.to_thread(system.terminate, drained) == 0, system.services[drained].log()
    system.start_service(drained)
    await shared_evenly(system)
    await storm.fail_over("the drained replica back")


def test_the_lab_is_closed(lab: Lab) -> None:
    for host in lab.hosts.values():
        assert host.default_routes() == []
    assert Path("/var/run/netns").exists()
