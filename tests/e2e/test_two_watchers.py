"""R7, two ARP watchers on one segment (docs/contract.md#order, #reliability): two capture taps of the lab's
bridge, each with a watcher process of its own id and metrics port, both publishing every gratuitous ARP of a
keepalived pair's failovers. Each failover is one transition, whichever watcher's claim comes first; one watcher
killed with SIGKILL in the middle of a series loses none while its twin runs; a refused frame is one audit row."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.e2e.system import System, ok, register_inventory
from tests.lab import Keepalived, Lab, LabHost
from tests.lab.keepalived import State
from tests.ports import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SUBNET = "203.0.113.0/24"
VRID = 71
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # service name -> HAVIP_WATCHER_ID
STEP_TIMEOUT_S = 30  # one failover: keepalived's own timers take about 4 s of it


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(SUBNET) as lab:
        lab.add_host("cvm1", "203.0.113.11")
        lab.add_host("cvm2", "203.0.113.12")
        lab.add_host("intruder", "203.0.113.66")
        lab.add_capture_port("tap1")
        lab.add_capture_port("tap2")
        yield lab


@pytest.fixture(scope="module")
def system(
    lab: Lab, database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    tap1, tap2 = lab.capture_ports["tap1"].iface, lab.capture_ports["tap2"].iface
    workdir = tmp_path_factory.mktemp("services")
    with System(database_url, amqp_url, tap1, workdir, watcher_id=WATCHERS["arp_watcher"]) as system:
        system.start_watcher("twin", tap2, free_port(), watcher_id=WATCHERS["twin"])
        system.wait_ready(names=("twin",))
        yield system


@pytest.fixture
def both_watchers(system: System, lab: Lab) -> None:
    """Both watchers running (a test before may have killed one)."""
    for name in WATCHERS:
        if system.services[name].process.poll() is not None:
            if name == "arp_watcher":
                system.start_service(name)
            else:
                tap2 = lab.capture_ports["tap2"].iface
                system.start_watcher(name, tap2, system.watcher_ports[name], watcher_id=WATCHERS[name])
    system.wait_ready(names=tuple(WATCHERS))


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in ("cvm1", "cvm2")}
    return register_inventory(system, "two-watchers", SUBNET, hosts)


class Pair:
    """keepalived on cvm1 (priority 100, preempting) and cvm2 (80): stopping cvm1's hands the address to cvm2,
    starting a new one on cvm1 takes it back."""

    def __init__(self, lab: Lab, vip: str) -> None:
        self.lab, self.vip = lab, vip
        self.cvm1, self.cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
        self.started: list[Keepalived] = []
        self.backup = self._keepalived(self.cvm2, self.cvm1.ip, 80, "BACKUP")
        self.master = self._keepalived(self.cvm1, self.cvm2.ip, 100, "MASTER")

    def _keepalived(self, host: LabHost, peer: str, priority: int, state: State) -> Keepalived:
        return Keepalived(
            host,
            vip=self.vip,
            vrid=VRID,
            peers=[peer],
            priority=priority,
            state=state,
            garp_master_delay=1,
            garp_master_refresh=5,
            workdir=self.lab.workdir,
        )

    def start(self, keepalived: Keepalived) -> None:
        self.started.append(keepalived)
        keepalived.start()

    def to_cvm2(self) -> None:
        self.master.stop()  # a priority-0 advert: cvm2 takes over at once

    def to_cvm1(self) -> None:
        self.master = self._keepalived(self.cvm1, self.cvm2.ip, 100, "MASTER")
        self.start(self.master)

    def close(self) -> None:
        for keepalived in self.started:
            keepalived.stop()
        for host in (self.cvm1, self.cvm2):
            if host.has_address(self.vip):
                host.del_address(self.vip)


async def history(database_url: str, havip_id: str) -> list[asyncpg.Record]:
    """The binding's own history of the HAVIP (what it committed), oldest first."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            """SELECT sequence, from_instance_id, to_instance_id, captured_ns, watcher_id, reason
               FROM binding.transitions WHERE havip_id = $1 ORDER BY sequence""",
            uuid.UUID(havip_id),
        )
    finally:
        await conn.close()


def claims(system: System, outcome: str) -> float:
    return system.metric("havip_claims_total", {"outcome": outcome})


def published(system: System, watcher: str) -> float:
    return system.metric("havip_watcher_claims_published_total", service=watcher)


async def test_a_refused_frame_seen_by_both_watchers_is_one_audit_row(
    system: System, lab: Lab, inventory: dict[str, Any], database_url: str, both_watchers: None
) -> None:
    with system.api() as api:
        havip = ok(api.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": "spoofed"}))
    refused_before = claims(system, "rejected")

    lab.hosts["intruder"].arping(havip["address"], count=1)

    await eventually(
        lambda: claims(system, "rejected") >= refused_before + 2, what="both watchers' claims of the frame refused"
    )

    async def audit() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(
                "SELECT mac::text, reason, watcher_id, count FROM binding.rejected_claims WHERE havip_id = $1",
                uuid.UUID(havip["id"]),
            )
        finally:
            await conn.close()

    async def both_counted() -> bool:
        return sum(int(r["count"]) for r in await audit()) >= 2

    await eventually(both_counted, what="the refused frame audited")
    [row] = await audit()
    assert (row["mac"], row["reason"], row["count"]) == (lab.hosts["intruder"].mac, "unknown_mac", 2)
    assert row["watcher_id"] in WATCHERS.values()


async def test_two_watchers_decide_each_failover_once_and_one_killed_loses_none(
    system: System, lab: Lab, inventory: dict[str, Any], database_url: str, both_watchers: None
) -> None:
    ids = {name: inventory["instances"][name]["id"] for name in ("cvm1", "cvm2")}
    with system.api() as api:
        havip = ok(api.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": "twin-watched"}))
    pair = Pair(lab, havip["address"])
    refused_before = claims(system, "rejected")
    holders: list[str] = []  # the holder after each change on the wire, in order

    async def fail_over(to: str) -> None:
        """One failover on the wire, waited for until the binding committed it as the next transition."""
        if to == "cvm2":
            pair.to_cvm2()
        else:
            pair.to_cvm1()
        holders.append(to)
        master, backup = (pair.backup, pair.master) if to == "cvm2" else (pair.master, pair.backup)

        async def committed() -> bool:
            rows = await history(database_url, havip["id"])
            return len(rows) >= len(holders) and master.is_master() and not backup.is_master()

        await eventually(committed, timeout=STEP_TIMEOUT_S, what=f"failover {len(holders)} (to {to}) committed")

    async def bound() -> bool:
        return len(await history(database_url, havip["id"])) >= 1

    try:
        # The intended master first, bound, before the backup starts (else the backup may be elected first).
        pair.start(pair.master)
        holders.append("cvm1")
        await eventually(bound, timeout=STEP_TIMEOUT_S, what="bound to cvm1")
        pair.start(pair.backup)
        before = {w: published(system, w) for w in WATCHERS}
        decided_without_moving = claims(system, "refresh") + claims(system, "stale")

        # Both watchers running: each failover's claims come from both, and only the first moves the binding.
        for to in ("cvm2", "cvm1", "cvm2", "cvm1"):
            await fail_over(to)
        both = len(holders) - 1
        # Each watcher published each failover's claim; the later one of every pair (the slower watcher's) was
        # decided as a refresh or stale, never as a transition.
        await eventually(
            lambda: all(published(system, w) >= before[w] + both for w in WATCHERS),
            what="both watchers' claims of every failover published",
        )
        await eventually(
            lambda: claims(system, "refresh") + claims(system, "stale") >= decided_without_moving + both,
            what="the second claim of every failover decided without a transition",
        )
        rows = await history(database_url, havip["id"])
        assert [str(r["to_instance_id"]) for r in rows] == [ids[h] for h in holders]

        # SIGKILL the watcher whose claim decided the last failover, and the series goes on at once.
        victim = next(name for name, wid in WATCHERS.items() if wid == rows[-1]["watcher_id"])
        survivor = next(name for name in WATCHERS if name != victim)
        system.kill(victim)
        for to in ("cvm2", "cvm1", "cvm2"):
            await fail_over(to)
        assert system.services[victim].process.poll() is not None
        assert system.services[survivor].process.poll() is None
    finally:
        pair.close()

    rows = await history(database_url, havip["id"])
    # One transition per failover, in order: no gap, no duplicate, each from the one before's holder.
    assert [r["sequence"] for r in rows] == list(range(1, len(holders) + 1))
    assert [str(r["to_instance_id"]) for r in rows] == [ids[h] for h in holders]
    assert all(r["reason"] == "claim" for r in rows)
    for before_row, after_row in itertools.pairwise(rows):
        assert after_row["from_instance_id"] == before_row["to_instance_id"]
        assert after_row["captured_ns"] > before_row["captured_ns"]
    assert {r["watcher_id"] for r in rows} <= set(WATCHERS.values())
    # After the kill, the twin alone decided every failover.
    assert {r["watcher_id"] for r in rows[both + 1 :]} == {WATCHERS[survivor]}
    # Nothing refused, by either watcher's claims.
    assert claims(system, "rejected") == refused_before
