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
import itertools
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from yarl import URL

from shared.partitions import partition_of
from shared.settings import CommonSettings
from tests.e2e.system import System, ok, register_inventory
from tests.lab import ArpCapture, ArpFrame, Keepalived, Lab, LabHost
from tests.listener import EventLog, listening
from tests.ports import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SUBNET = "203.0.113.0/24"
PARTITIONS = 8
HOSTS = {"cvm1": "203.0.113.11", "cvm2": "203.0.113.12", "cvm3": "203.0.113.13", "cvm4": "203.0.113.14"}
PAIRS = (("cvm1", "cvm2"), ("cvm3", "cvm4"))
VRIDS = (81, 82, 83, 84)  # two VRRP instances per pair: 81, 82 on the first, 83, 84 on the second
REPLICAS = {"binding": "binding-1", "binding-2": "binding-2", "binding-3": "binding-3"}  # name -> replica id
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # name -> HAVIP_WATCHER_ID
ALLOCATORS = ("allocator", "allocator-2")
LEASE_TIMEOUT_S = 2  # a frozen replica loses its partitions this soon...
AMQP_HEARTBEAT_S = 2  # ...and RabbitMQ its consumers soon after
STEP_TIMEOUT_S = 30  # one step (a failover committed, the replicas sharing again) on a busy 2-core machine
KEEPALIVED_STATE_TIMEOUT_S = 20


def one_address_per_partition() -> list[str]:
    """The first address from 203.0.113.100 on in each partition: the HAVIPs, indexed by their partition."""
    found: dict[int, str] = {}
    for address in IPv4Network(SUBNET).hosts():
        if address >= IPv4Address("203.0.113.100"):
            found.setdefault(partition_of(address, PARTITIONS), str(address))
    assert sorted(found) == list(range(PARTITIONS))
    return [found[p] for p in range(PARTITIONS)]


ADDRESSES = one_address_per_partition()


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


class VrrpInstance:
    """One VRRP instance of a keepalived pair, holding two HAVIPs (its VIP and an excluded one). Both nodes run
    `nopreempt`, so that a node started again stays backup; a failover stops the master's keepalived (its
    priority-0 advert hands the addresses over at once) and then starts it again, as the backup."""

    def __init__(self, lab: Lab, vrid: int, first: LabHost, second: LabHost, vips: tuple[str, str]) -> None:
        self.lab, self.vrid, self.vips = lab, vrid, vips
        self.nodes = (first, second)
        self.priority = {first.name: 100, second.name: 80}  # the first master is `first`
        self.running: dict[str, Keepalived] = {}
        self.starts = 0
        self.master = first
        self.holders: list[str] = []  # the host that took the addresses, at each change on the wire

    def __repr__(self) -> str:
        return f"VRRP {self.vrid} {self.vips} on {[n.name for n in self.nodes]}"

    def other(self, host: LabHost) -> LabHost:
        return self.nodes[1] if host is self.nodes[0] else self.nodes[0]

    def start(self, host: LabHost) -> None:
        peer = self.other(host)
        self.starts += 1
        keepalived = Keepalived(
            host,
            vip=self.vips[0],
            extra_vips=[self.vips[1]],
            vrid=self.vrid,
            peers=[peer.ip],
            priority=self.priority[host.name],
            state="BACKUP",
            nopreempt=True,
            garp_master_delay=1,
            garp_master_refresh=2,  # the holder's renewals keep coming between the changes of holder
            workdir=self.lab.workdir / f"vrrp{self.vrid}-{self.starts}",
        )
        keepalived.start()
        self.running[host.name] = keepalived

    def start_first(self) -> None:
        self.start(self.master)
        self.holders.append(self.master.name)

    def stop_master(self) -> None:
        """The master's keepalived stopped: the backup takes over."""
        self.running.pop(self.master.name).stop()
        self.master = self.other(self.master)
        self.holders.append(self.master.name)

    def restart_backup(self) -> None:
        self.start(self.other(self.master))

    def settled(self) -> bool:
        """The master holds both addresses and the other node neither."""
        backup = self.other(self.master)
        return all(self.master.has_address(v) and not backup.has_address(v) for v in self.vips)

    def backup_ready(self) -> bool:
        backup = self.running.get(self.other(self.master).name)
        return backup is not None and "Entering BACKUP STATE" in backup.log_tail(200)

    def close(self) -> None:
        """The backup stopped first, then the master: nobody takes the addresses over on the way out."""
        for name in sorted(self.running, key=lambda n: n == self.master.name):
            self.running.pop(name).stop()
        for host in self.nodes:
            for vip in self.vips:
                if host.has_address(vip):
                    host.del_address(vip)


class Storm:
    """The four VRRP instances and their eight HAVIPs; every failover moves all four at once."""

    def __init__(self, lab: Lab, db: asyncpg.Connection, havips: dict[str, dict[str, Any]]) -> None:
        self.lab, self.db, self.havips = lab, db, havips
        self.vrrp: list[VrrpInstance] = []
        for index, vrid in enumerate(VRIDS):
            pair = [lab.hosts[name] for name in PAIRS[index // 2]]
            first, second = pair if index % 2 == 0 else pair[::-1]  # each node master of one instance
            self.vrrp.append(
                VrrpInstance(lab, vrid, first, second, (ADDRESSES[2 * index], ADDRESSES[2 * index + 1]))
            )
        self.failovers: list[str] = []  # what each failover went with

    def instance_of(self, address: str) -> VrrpInstance:
        return next(v for v in self.vrrp if address in v.vips)

    def expected_bindings(self, instances: dict[str, str]) -> dict[str, tuple[str, str | None]]:
        """What the API must show of every HAVIP: bound to its instance's current master."""
        return {address: ("BOUND", instances[self.instance_of(address).master.name]) for address in self.havips}

    async def committed(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT havip_id::text AS id, count(*) AS n FROM binding.transitions GROUP BY 1"
        )
        return {r["id"]: int(r["n"]) for r in rows}

    async def all_committed(self) -> bool:
        """Every change of holder on the wire so far is a committed transition."""
        counts = await self.committed()
        return all(counts.get(h["id"], 0) >= len(self.instance_of(a).holders) for a, h in self.havips.items())

    async def start(self) -> None:
        """Each instance's first master alone (so that it is elected, and bound, first), then its backup."""
        for vrrp in self.vrrp:
            await asyncio.to_thread(vrrp.start_first)
        await eventually(
            lambda: all(v.settled() for v in self.vrrp),
            timeout=KEEPALIVED_STATE_TIMEOUT_S,
            what="the first masters",
        )
        await eventually(self.all_committed, timeout=STEP_TIMEOUT_S, what="every HAVIP bound to its first master")
        for vrrp in self.vrrp:
            await asyncio.to_thread(vrrp.restart_backup)
        await eventually(
            lambda: all(v.backup_ready() for v in self.vrrp),
            timeout=KEEPALIVED_STATE_TIMEOUT_S,
            what="the backups",
        )

    async def fail_over(
        self, during: str, as_it_happens: Callable[[], object] | None = None, *, committed: bool = True
    ) -> None:
        """Every instance's master stopped at once; waited for until the backups hold the addresses, the stopped
        nodes are backups again and (unless not `committed`) the binding committed every change so far.
        `as_it_happens` is called as soon as the first backup has taken its addresses: its gratuitous ARPs are on
        the wire."""
        self.failovers.append(during)
        what = f"failover {len(self.failovers)} ({during})"
        taking = [(v, v.other(v.master)) for v in self.vrrp]
        stopping = asyncio.gather(*(asyncio.to_thread(v.stop_master) for v in self.vrrp))
        try:
            if as_it_happens is not None:
                await eventually(
                    lambda: any(host.has_address(v.vips[0]) for v, host in taking),
                    timeout=KEEPALIVED_STATE_TIMEOUT_S,
                    interval=0.005,
                    what=f"{what}: the first takeover",
                )
                as_it_happens()
        finally:
            await stopping
        await eventually(
            lambda: all(v.settled() for v in self.vrrp), timeout=KEEPALIVED_STATE_TIMEOUT_S, what=f"{what}: taken"
        )
        await asyncio.gather(*(asyncio.to_thread(v.restart_backup) for v in self.vrrp))
        if committed:
            await eventually(self.all_committed, timeout=STEP_TIMEOUT_S, interval=0.05, what=f"{what}: committed")
        await eventually(
            lambda: all(v.backup_ready() for v in self.vrrp),
            timeout=KEEPALIVED_STATE_TIMEOUT_S,
            what=f"{what}: the stopped nodes backups again",
        )

    def close(self) -> None:
        for vrrp in self.vrrp:
            vrrp.close()


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


def wire_claimants(frames: list[ArpFrame], addresses: list[str]) -> dict[str, list[str]]:
    """Per address, the MACs that claimed it on the wire (the claim rule: a gratuitous request, or a reply from the
    address), in capture order, repeats of one claimant folded."""
    claimants: dict[str, list[str]] = {address: [] for address in addresses}
    for frame in sorted(frames, key=lambda f: f.timestamp):
        claim = (frame.op == 1 and frame.sender_ip == frame.target_ip) or frame.op == 2
        if claim and frame.sender_ip in claimants:
            macs = claimants[frame.sender_ip]
            if not macs or macs[-1] != frame.sender_mac:
                macs.append(frame.sender_mac)
    return claimants


async def history(db: asyncpg.Connection, havip_id: str) -> list[asyncpg.Record]:
    """The binding's own history of one HAVIP, oldest first."""
    return await db.fetch(
        """SELECT sequence, from_instance_id::text, to_instance_id::text, reason, watcher_id
           FROM binding.transitions WHERE havip_id = $1 ORDER BY sequence""",
        uuid.UUID(havip_id),
    )


async def last_deciding_watcher(db: asyncpg.Connection) -> str:
    """The watcher whose claims decided most of the newest transitions of the HAVIPs: the one relied on."""
    rows = await db.fetch(
        """SELECT DISTINCT ON (havip_id) watcher_id FROM binding.transitions ORDER BY havip_id, sequence DESC"""
    )
    leader, _ = Counter(r["watcher_id"] for r in rows).most_common(1)[0]
    return next(name for name, watcher_id in WATCHERS.items() if watcher_id == leader)


def shown(system: System, allocator: str, havips: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str | None]]:
    with system.api(allocator) as api:
        return {
            address: (found["state"], found["bound_instance_id"])
            for address, havip in havips.items()
            for found in [ok(api.get(f"/havips/{havip['id']}"))]
        }


def shown_histories(system: System, allocator: str, havips: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    with system.api(allocator) as api:
        return {
            address: sorted(
                (t["sequence"], t["from_instance_id"], t["to_instance_id"])
                for t in ok(api.get(f"/havips/{havip['id']}/transitions", params={"limit": 1000}))["items"]
            )
            for address, havip in havips.items()
        }


async def test_a_failover_storm_loses_and_duplicates_nothing_whichever_replica_is_taken_away(
    lab: Lab, system: System, inventory: dict[str, Any], db: asyncpg.Connection
) -> None:
    instances = {name: inventory["instances"][name]["id"] for name in HOSTS}
    havips: dict[str, dict[str, Any]] = {}
    for index, address in enumerate(ADDRESSES):
        body = {
            "subnet_id": inventory["subnet"]["id"],
            "name": f"storm-{index}",
            "address": address,
            "candidates": [instances[name] for name in PAIRS[index // 4]],  # its pair's two nodes
        }
        with system.api(ALLOCATORS[index % 2]) as api:  # either allocator answers
            havips[address] = ok(api.post("/havips", json=body))
    assert sorted(partition_of(IPv4Address(a), PARTITIONS) for a in havips) == list(range(PARTITIONS))

    async def known_to_the_binding() -> bool:
        ids = [uuid.UUID(h["id"]) for h in havips.values()]
        return int(await db.fetchval("SELECT count(*) FROM binding.havips WHERE id = ANY($1)", ids)) == len(ids)

    await eventually(known_to_the_binding, timeout=STEP_TIMEOUT_S, what="the HAVIPs in the binding's inventory")
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
            await check_the_outcome(storm, system, db, events, instances, wire_claimants(wire.frames, ADDRESSES))
        finally:
            storm.close()


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


async def check_the_outcome(
    storm: Storm,
    system: System,
    db: asyncpg.Connection,
    events: EventLog,
    instances: dict[str, str],
    claimants: dict[str, list[str]],
) -> None:
    havips = storm.havips
    host_of_mac = {storm.lab.hosts[name].mac: name for name in HOSTS}

    # Every HAVIP bound to keepalived's current master, the wire's last claimant, as both allocators show it.
    masters = {address: storm.instance_of(address).master.name for address in havips}
    assert {a: host_of_mac[macs[-1]] for a, macs in claimants.items()} == masters
    expected = storm.expected_bindings(instances)
    for allocator in ALLOCATORS:
        await eventually(
            shows(system, allocator, havips, expected),
            timeout=STEP_TIMEOUT_S,
            what=f"every HAVIP on keepalived's master, as {allocator} shows it",
        )

    # Each failover exactly one transition: the history runs 1..n, its holders the wire's claimants, in turn.
    histories: dict[str, list[tuple[int, str | None, str]]] = {}
    for address, havip in havips.items():
        rows = await history(db, havip["id"])
        planned = storm.instance_of(address).holders
        assert len(planned) == len(storm.failovers) + 1
        on_the_wire = [host_of_mac[mac] for mac in claimants[address]]
        assert on_the_wire == planned, f"{address}: on the wire {on_the_wire}, caused {planned}"
        assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1)), f"{address}: gap or repeat"
        assert [r["to_instance_id"] for r in rows] == [instances[h] for h in on_the_wire], (
            f"{address}: history {[r['to_instance_id'] for r in rows]}, the wire's {on_the_wire}, "
            f"failovers {storm.failovers}"
        )
        assert rows[0]["from_instance_id"] is None
        for before, after in itertools.pairwise(rows):
            assert after["from_instance_id"] == before["to_instance_id"], f"{address}: broken chain"
        assert {r["reason"] for r in rows} == {"claim"}
        assert {r["watcher_id"] for r in rows} <= set(WATCHERS.values())
        histories[address] = [(r["sequence"], r["from_instance_id"], r["to_instance_id"]) for r in rows]
    # The allocators' view, kept from the events, has the same histories.
    await eventually(
        lambda: shown_histories(system, "allocator-2", havips) == histories,
        timeout=STEP_TIMEOUT_S,
        what="the API's histories equal to the binding's",
    )

    # No claim of a registered instance refused, in the binding's audit or the API's.
    refused = await db.fetch("SELECT address::text, mac::text, reason, watcher_id FROM binding.rejected_claims")
    assert [dict(r) for r in refused] == []
    for allocator in ALLOCATORS:
        with system.api(allocator) as api:
            assert ok(api.get("/claims/rejected", params={"limit": 1000}))["items"] == []

    # One havip.binding.changed per transition: every one published, never two event ids for one sequence.
    await eventually(lambda: outbox_empty(db), timeout=STEP_TIMEOUT_S, what="every committed event published")
    wanted = {(h["id"], seq) for a, h in havips.items() for seq, _, _ in histories[a]}
    await eventually(
        lambda: wanted <= set(published(events)), timeout=STEP_TIMEOUT_S, what="every transition's event received"
    )
    by_sequence = published(events)
    assert set(by_sequence) == wanted, "events of transitions the binding has not committed"
    assert {key: ids for key, ids in by_sequence.items() if len(ids) > 1} == {}
    address_of = {h["id"]: a for a, h in havips.items()}
    for env in events.envelopes("havip.binding.changed"):
        _, _, holder = histories[address_of[env.data["havip_id"]]][int(env.data["sequence"]) - 1]
        assert env.data["current"]["instance_id"] == holder


def shows(
    system: System, allocator: str, havips: dict[str, dict[str, Any]], expected: dict[str, tuple[str, str | None]]
) -> Callable[[], bool]:
    return lambda: shown(system, allocator, havips) == expected


async def outbox_empty(db: asyncpg.Connection) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM binding.outbox")) == 0


def published(events: EventLog) -> dict[tuple[str, int], set[uuid.UUID]]:
    """The event ids received for each (HAVIP, sequence)."""
    found: dict[tuple[str, int], set[uuid.UUID]] = {}
    for env in events.envelopes("havip.binding.changed"):
        found.setdefault((env.data["havip_id"], int(env.data["sequence"])), set()).add(env.event_id)
    return found


def test_the_lab_is_closed(lab: Lab) -> None:
    for host in lab.hosts.values():
        assert host.default_routes() == []
    assert Path("/var/run/netns").exists()
