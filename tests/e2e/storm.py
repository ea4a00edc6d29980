"""A failover storm of real keepalived pairs in the lab, and the check of its outcome, shared by the end-to-end
tests that take processes and engines away under it: two keepalived pairs, each with two VRRP instances of two
HAVIPs — one HAVIP in each of the 8 partitions — failing over all at once, again and again; a capture of the
test's own as the reference for what was claimed on the wire."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

import asyncpg

from shared.partitions import partition_of
from tests.e2e.system import System, ok
from tests.lab import ArpFrame, Keepalived, Lab, LabHost
from tests.listener import EventLog
from tests.waiting import eventually

SUBNET = "203.0.113.0/24"
PARTITIONS = 8
HOSTS = {"cvm1": "203.0.113.11", "cvm2": "203.0.113.12", "cvm3": "203.0.113.13", "cvm4": "203.0.113.14"}
PAIRS = (("cvm1", "cvm2"), ("cvm3", "cvm4"))
VRIDS = (81, 82, 83, 84)  # two VRRP instances per pair: 81, 82 on the first, 83, 84 on the second
STEP_TIMEOUT_S = 30  # one step (a failover committed, the replicas sharing again) on a busy 2-core machine
KEEPALIVED_STATE_TIMEOUT_S = 20


class Reads(Protocol):
    """What the storm reads of the binding's tables: an asyncpg connection, or one that follows a failover."""

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]: ...

    async def fetchval(self, query: str, *args: object) -> Any: ...


def one_address_per_partition() -> list[str]:
    """The first address from 203.0.113.100 on in each partition: the HAVIPs, indexed by their partition."""
    found: dict[int, str] = {}
    for address in IPv4Network(SUBNET).hosts():
        if address >= IPv4Address("203.0.113.100"):
            found.setdefault(partition_of(address, PARTITIONS), str(address))
    assert sorted(found) == list(range(PARTITIONS))
    return [found[p] for p in range(PARTITIONS)]


ADDRESSES = one_address_per_partition()


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

    def __init__(
        self,
        lab: Lab,
        db: Reads,
        havips: dict[str, dict[str, Any]],
        *,
        step_timeout_s: float = STEP_TIMEOUT_S,
    ) -> None:
        self.lab, self.db, self.havips = lab, db, havips
        self.step_timeout_s = step_timeout_s  # a failover committed (longer where an engine fails under it)
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
        await eventually(
            self.all_committed, timeout=self.step_timeout_s, what="every HAVIP bound to its first master"
        )
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
            await eventually(
                self.all_committed, timeout=self.step_timeout_s, interval=0.05, what=f"{what}: committed"
            )
        await eventually(
            lambda: all(v.backup_ready() for v in self.vrrp),
            timeout=KEEPALIVED_STATE_TIMEOUT_S,
            what=f"{what}: the stopped nodes backups again",
        )

    def close(self) -> None:
        for vrrp in self.vrrp:
            vrrp.close()


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


async def history(db: Reads, havip_id: str) -> list[asyncpg.Record]:
    """The binding's own history of one HAVIP, oldest first."""
    return await db.fetch(
        """SELECT sequence, from_instance_id::text, to_instance_id::text, reason, watcher_id
           FROM binding.transitions WHERE havip_id = $1 ORDER BY sequence""",
        uuid.UUID(havip_id),
    )


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


def allocate_havips(
    system: System, inventory: dict[str, Any], instances: dict[str, str], allocators: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """The eight HAVIPs, one in each partition, each with its pair's two nodes as candidates, allocated through
    the allocators in turn."""
    havips: dict[str, dict[str, Any]] = {}
    for index, address in enumerate(ADDRESSES):
        body = {
            "subnet_id": inventory["subnet"]["id"],
            "name": f"storm-{index}",
            "address": address,
            "candidates": [instances[name] for name in PAIRS[index // 4]],  # its pair's two nodes
        }
        with system.api(allocators[index % len(allocators)]) as api:
            havips[address] = ok(api.post("/havips", json=body))
    assert sorted(partition_of(IPv4Address(a), PARTITIONS) for a in havips) == list(range(PARTITIONS))
    return havips


async def known_to_the_binding(db: Reads, havips: dict[str, dict[str, Any]]) -> bool:
    ids = [uuid.UUID(h["id"]) for h in havips.values()]
    return int(await db.fetchval("SELECT count(*) FROM binding.havips WHERE id = ANY($1)", ids)) == len(ids)


async def check_the_outcome(
    storm: Storm,
    system: System,
    db: Reads,
    events: EventLog,
    instances: dict[str, str],
    claimants: dict[str, list[str]],
    *,
    allocators: tuple[str, ...],
    watcher_ids: set[str],
) -> None:
    """Every HAVIP bound to keepalived's current master, the wire's last claimant, as every allocator shows it;
    each failover exactly one transition (the history 1..n, its holders the wire's claimants, in turn), the same
    histories in the allocators' view; no claim of a registered instance refused; every transition's event
    published once, the outbox empty."""
    havips = storm.havips
    host_of_mac = {storm.lab.hosts[name].mac: name for name in HOSTS}

    # Every HAVIP bound to keepalived's current master, the wire's last claimant, as both allocators show it.
    masters = {address: storm.instance_of(address).master.name for address in havips}
    assert {a: host_of_mac[macs[-1]] for a, macs in claimants.items()} == masters
    expected = storm.expected_bindings(instances)
    for allocator in allocators:
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
        assert {r["watcher_id"] for r in rows} <= watcher_ids
        histories[address] = [(r["sequence"], r["from_instance_id"], r["to_instance_id"]) for r in rows]
    # The allocators' view, kept from the events, has the same histories.
    await eventually(
        lambda: all(shown_histories(system, allocator, havips) == histories for allocator in allocators),
        timeout=STEP_TIMEOUT_S,
        what="the API's histories equal to the binding's",
    )

    # No claim of a registered instance refused, in the binding's audit or the API's.
    refused = await db.fetch("SELECT address::text, mac::text, reason, watcher_id FROM binding.rejected_claims")
    assert [dict(r) for r in refused] == []
    for allocator in allocators:
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


async def outbox_empty(db: Reads) -> bool:
    return int(await db.fetchval("SELECT count(*) FROM binding.outbox")) == 0


def published(events: EventLog) -> dict[tuple[str, int], set[uuid.UUID]]:
    """The event ids received for each (HAVIP, sequence)."""
    found: dict[tuple[str, int], set[uuid.UUID]] = {}
    for env in events.envelopes("havip.binding.changed"):
        found.setdefault((env.data["havip_id"], int(env.data["sequence"])), set()).add(env.event_id)
    return found
