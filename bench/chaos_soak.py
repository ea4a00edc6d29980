"""A chaos soak on the clustered engines: thousands of failovers while broker nodes, the Postgres primary and
every kind of service process are killed or frozen, one after another.

    .venv/bin/python -m bench.chaos_soak [--havips 100] [--failovers 10000] [--fault-every 5] [--json]

Short mode (a quick check, 2–3 minutes): `--havips 20 --failovers 400 --fault-every 3`. Root.

What one run does — tests/e2e/test_chaos.py scaled up, on engines and a lab of its own:

1. a three-node RabbitMQ cluster (tests/clusters/rabbitmq.py, ports from `--rabbit-port-base`) and a Postgres
   primary with a synchronous standby under pg_auto_failover (tests/clusters/postgres.py, ports from
   `--pg-port-base`), each in a temporary directory; a database and an AMQP prefix of the run's own;
2. a closed lab on the benchmarking range 198.18.0.0/15: two servers `cvma`, `cvmb` and two capture taps; the
   services as processes (tests/e2e/system.py), each given the three broker URLs and the multi-host DSN, a short
   AMQP heartbeat and lease: three binding replicas, two watchers (one per tap), two allocators;
3. N = `--havips` HAVIPs (198.18.16.0 onwards) allocated through the allocators in turn, each with the two
   servers as candidates; cvma claims them all (keepalived's burst: 5 GARPs per address, from a raw socket in
   its namespace) and the run waits until cvma holds every one;
4. rounds: the other server sends its burst for every HAVIP (a failover of all N), and the run waits until it
   holds them all (a round not committed within `--round-deadline` is noted and the next one starts) —
   `--failovers` / N rounds, each started at least `--round-every` seconds after the one before. The first
   `--reference-rounds` go without faults; from then on, before a round's burst, when `--fault-every` seconds have
   passed since the last fault, the next fault of the cycle is injected (so that the round goes through it at
   once); its mending runs beside the rounds, and the next fault of the same tier waits until it is mended:
   - *broker node killed*: kill -9 the node leading most binding partition queues, started again at once,
     mended once the three run in one cluster;
   - *broker node frozen*: SIGSTOP that node for `--freeze-s` (longer than net_ticktime = 10 s), SIGCONT, and
     restarted if it stays cut off (as it does under `pause_minority`), mended once the three run in one cluster;
   - *Postgres primary killed*: kill -9 the primary's whole node; once the standby is promoted the node is
     started again, mended once `wait_healthy` passes (primary, secondary, synchronous standby);
   - *binding replica*, *watcher*, *allocator killed*: kill -9 one (in turn), started again, mended when ready
   (`--faults` takes a part of the cycle: broker-kill, postgres-kill, binding-kill, broker-freeze, watcher-kill,
   allocator-kill);
5. the outcome, checked as test_chaos checks it: each transition is attributed to the round whose burst its
   claim was captured in (`captured_ns`, the watcher's kernel time); **lost** = a round that should have moved a
   HAVIP and committed no transition for it, **duplicated** = more than one transition of a HAVIP in one round,
   or two event ids for one (HAVIP, sequence) among the `havip.binding.changed` events a durable listener of
   the run's own received through the broker failovers (tests/listener.py), **wrong** = a HAVIP whose binding,
   or either allocator's view, is not the last claimant; every history contiguous 1..n, each transition from
   the holder before; the outbox empty; each allocator's histories equal to the binding's;
6. the figures: failovers caused, faults by kind, lost / duplicated / wrong, and per fault kind the worst
   **recovery** — from the fault to the first commit of a claim captured after it —, the fault → the last
   commit of the round sent right after it, and the slowest round while it lasted (until mended), beside the
   reference of the same run: the rounds during which no fault was outstanding, the first ones among them
   (burst → first and → last commit).

Everything it started is stopped and removed at the end, also on failure, Ctrl-C or SIGTERM: the services by
their process groups (a frozen one thawed first), the lab's namespaces, the RabbitMQ nodes and the Postgres nodes
by the PIDs their scripts recorded, their directories. The services' logs stay in a directory named at the end
when the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from bench.common import machine, percentile, say
from bench.standby import check_histories, histories_ok
from shared.partitions import DEFAULT_PARTITIONS
from shared.settings import CommonSettings
from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import RabbitCluster, node_number
from tests.e2e.clustered import OnThePrimary
from tests.e2e.system import System, ok, register_inventory
from tests.lab import Lab
from tests.lab.raw import RawSender
from tests.listener import EventLog, listening_through_failovers
from tests.ports import free_port
from tests.waiting import eventually

T = TypeVar("T")

SUBNET = "198.18.0.0/15"
SERVERS = {"cvma": "198.18.0.11", "cvmb": "198.18.0.12"}
HAVIP_BASE = IPv4Address("198.18.16.0")
BURST = 5  # keepalived's garp_master_repeat
PARTITIONS = DEFAULT_PARTITIONS
REPLICAS = {"binding": "binding-1", "binding-2": "binding-2", "binding-3": "binding-3"}  # name -> replica id
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # name -> HAVIP_WATCHER_ID
ALLOCATORS = ("allocator", "allocator-2")
AMQP_HEARTBEAT_S = 2
LEASE_TIMEOUT_S = 3
STEP_TIMEOUT_S = 120.0  # one wait of the set-up, the check or a mending
READ_TIMEOUT_S = 120.0  # a read of the run's own, through a Postgres failover

# The cycle of faults: (kind, tier). A tier has one fault at a time; kinds of other tiers alternate between two
# broker faults, so that a broker node is rarely still restarting when the next broker fault is due.
FAULTS = (
    ("broker node killed", "broker"),
    ("Postgres primary killed", "database"),
    ("binding replica killed", "binding"),
    ("broker node frozen", "broker"),
    ("watcher killed", "watcher"),
    ("allocator killed", "allocator"),
)

FAULT_NAMES = {
    "broker node killed": "broker-kill",
    "Postgres primary killed": "postgres-kill",
    "binding replica killed": "binding-kill",
    "broker node frozen": "broker-freeze",
    "watcher killed": "watcher-kill",
    "allocator killed": "allocator-kill",
}


def now_ns() -> int:
    return time.time_ns()


# ---- the faults -----------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    tier: str
    target: str = ""
    round: int = 0
    at_ns: int = 0
    mended_ns: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def outstanding_during(self, start_ns: int, end_ns: int) -> bool:
        return self.at_ns <= end_ns and (self.mended_ns is None or self.mended_ns >= start_ns)


def cluster_status(rabbit: RabbitCluster) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = json.loads(rabbit.ctl("-q", "cluster_status", "--formatter", "json"))
    except Exception:
        return None
    return status


def cluster_whole(rabbit: RabbitCluster) -> bool:
    """The three nodes running in one cluster, no partition recorded."""
    status = cluster_status(rabbit)
    return status is not None and len(status.get("running_nodes") or []) == 3 and not status.get("partitions")


def busiest_leader(rabbit: RabbitCluster, prefix: str) -> int:
    """The broker node leading most of the binding's partition queues (one `rabbitmqctl list_queues`)."""
    rows = rabbit.queue_rows("name", "leader")
    wanted = {f"{prefix}binding.partition.{p}" for p in range(PARTITIONS)}
    leaders = [node_number(r["leader"]) for r in rows if r["name"] in wanted and r.get("leader")]
    if not leaders:
        raise RuntimeError("no leader found for the binding's partition queues")
    return max(sorted(set(leaders)), key=leaders.count)


class Chaos:
    """Injects the faults of the cycle, one at a time, and mends each beside the rounds."""

    def __init__(
        self,
        system: System,
        rabbit: RabbitCluster,
        postgres: PostgresHA,
        prefix: str,
        *,
        every_s: float,
        freeze_s: float,
        max_faults: int,
        kinds: tuple[str, ...],
    ) -> None:
        self.system, self.rabbit, self.postgres, self.prefix = system, rabbit, postgres, prefix
        self.cycle = tuple((kind, tier) for kind, tier in FAULTS if kind in kinds)
        self.every_s, self.freeze_s, self.max_faults = every_s, freeze_s, max_faults
        self.faults: list[Fault] = []
        self.next_kind = 0
        self.last_at = time.monotonic()
        self.busy: dict[str, asyncio.Task[None]] = {}  # tier -> its mending
        self.turns: Counter[str] = Counter()  # kind -> how many so far (which process is next)
        self.failed: BaseException | None = None

    def due(self) -> bool:
        if len(self.faults) >= self.max_faults or time.monotonic() - self.last_at < self.every_s:
            return False
        _, tier = self.cycle[self.next_kind % len(self.cycle)]
        task = self.busy.get(tier)
        return task is None or task.done()

    def check(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"a fault could not be mended: {self.failed!r}") from self.failed

    def _take_turn(self, kind: str, names: tuple[str, ...]) -> str:
        name = names[self.turns[kind] % len(names)]
        self.turns[kind] += 1
        return name

    async def inject(self, round_: int) -> Fault:
        kind, tier = self.cycle[self.next_kind % len(self.cycle)]
        self.next_kind += 1
        fault = Fault(kind, tier, round=round_)
        if kind == "broker node killed":
            node = await asyncio.to_thread(busiest_leader, self.rabbit, self.prefix)
            fault.target = f"rabbit node {node}"
            fault.at_ns = now_ns()
            await asyncio.to_thread(self.rabbit.kill, node)
            mend = self._broker_back(fault, node, thaw=False)
        elif kind == "broker node frozen":
            node = await asyncio.to_thread(busiest_leader, self.rabbit, self.prefix)
            fault.target = f"rabbit node {node}"
            fault.at_ns = now_ns()
            await asyncio.to_thread(self.rabbit.freeze, node)
            mend = self._broker_back(fault, node, thaw=True)
        elif kind == "Postgres primary killed":
            fault.at_ns = now_ns()
            killed = (await asyncio.to_thread(self.postgres.kill_node, "primary")).strip()
            fault.target = killed
            mend = self._postgres_back(fault, killed)
        else:
            names = {
                "binding replica killed": tuple(REPLICAS),
                "watcher killed": tuple(WATCHERS),
                "allocator killed": ALLOCATORS,
            }[kind]
            name = self._take_turn(kind, names)
            fault.target = name
            fault.at_ns = now_ns()
            await asyncio.to_thread(self.system.kill, name)
            mend = self._process_back(fault, name)
        self.faults.append(fault)
        self.last_at = time.monotonic()
        self.busy[tier] = asyncio.create_task(self._mending(fault, mend), name=f"mending: {kind}")
        say(f"round {round_}: {kind} ({fault.target})")
        return fault

    async def _mending(self, fault: Fault, mend: Awaitable[None]) -> None:
        try:
            await mend
            fault.mended_ns = now_ns()
            say(f"  mended: {fault.kind} ({fault.target}) after {(fault.mended_ns - fault.at_ns) / 1e9:.1f} s")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            fault.error = repr(exc)
            self.failed = exc
            say(f"  NOT mended: {fault.kind} ({fault.target}): {exc!r}")

    async def _broker_back(self, fault: Fault, node: int, *, thaw: bool) -> None:
        if thaw:
            await asyncio.sleep(self.freeze_s)
            await asyncio.to_thread(self.rabbit.thaw, node)
            fault.notes["thawed_after_s"] = round((now_ns() - fault.at_ns) / 1e9, 2)
            try:  # a node declared down while frozen stays cut off once thawed (pause_minority does not heal it)
                await eventually(
                    lambda: asyncio.to_thread(cluster_whole, self.rabbit),
                    timeout=8,
                    interval=1.0,
                    what="the thawed node back in the cluster by itself",
                )
                fault.notes["restarted"] = False
                return
            except TimeoutError:
                fault.notes["restarted"] = True
        await asyncio.to_thread(self.rabbit.restart, node)
        await eventually(
            lambda: asyncio.to_thread(cluster_whole, self.rabbit),
            timeout=STEP_TIMEOUT_S,
            interval=1.0,
            what=f"broker node {node} back in the cluster",
        )

    async def _postgres_back(self, fault: Fault, killed: str) -> None:
        other = self.postgres.other(killed)

        def promoted() -> bool:
            try:
                return self.postgres.primary() == other
            except RuntimeError:
                return False

        await eventually(
            lambda: asyncio.to_thread(promoted), timeout=STEP_TIMEOUT_S, interval=0.5, what=f"{other} promoted"
        )
        fault.notes["standby_promoted_s"] = round((now_ns() - fault.at_ns) / 1e9, 2)
        await asyncio.to_thread(self.postgres.restart_node, killed)
        await asyncio.to_thread(self.postgres.wait_healthy)

    async def _process_back(self, fault: Fault, name: str) -> None:
        await asyncio.to_thread(self.system.start_service, name)
        await asyncio.to_thread(self.system.wait_ready, STEP_TIMEOUT_S, (name,))

    async def mend_all(self) -> None:
        for task in list(self.busy.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.check()

    async def cancel(self) -> None:
        for task in self.busy.values():
            task.cancel()
        for task in self.busy.values():
            with contextlib.suppress(BaseException):
                await task


# ---- the rounds -------------------------------------------------------------------------------------------------


@dataclass
class Round:
    number: int  # 0: the first claims
    claimant: str
    sent_ns: int
    committed: bool = True
    waited_s: float = 0.0


@dataclass
class Soak:
    db: OnThePrimary
    senders: dict[str, RawSender]
    instances: dict[str, str]  # server name -> instance id
    havips: dict[str, str]  # address -> HAVIP id
    round_deadline_s: float
    rounds: list[Round] = field(default_factory=list)

    async def held_by(self, server: str) -> int:
        ids = [uuid.UUID(h) for h in self.havips.values()]
        found = await self.db.fetchval(
            "SELECT count(*) FROM binding.bindings WHERE instance_id = $1 AND havip_id = ANY($2::uuid[])",
            uuid.UUID(self.instances[server]),
            ids,
        )
        return int(found)

    async def round(self, number: int, claimant: str) -> Round:
        sender = self.senders[claimant]
        frames = [sender.garp(address) for address in self.havips]
        started = time.monotonic()
        done = Round(number, claimant, now_ns())
        for _ in range(BURST):
            sender.send(frames)
        want = len(self.havips)

        async def all_held() -> bool:
            return await self.held_by(claimant) == want

        try:
            await eventually(all_held, timeout=self.round_deadline_s, interval=0.02, what=f"round {number}")
        except TimeoutError:
            done.committed = False
            say(f"round {number}: not committed within {self.round_deadline_s} s")
        done.waited_s = time.monotonic() - started
        self.rounds.append(done)
        return done


# ---- the outcome ------------------------------------------------------------------------------------------------


def published(events: EventLog) -> dict[tuple[str, int], set[uuid.UUID]]:
    found: dict[tuple[str, int], set[uuid.UUID]] = {}
    for env in events.envelopes("havip.binding.changed"):
        found.setdefault((env.data["havip_id"], int(env.data["sequence"])), set()).add(env.event_id)
    return found


def shown(system: System, allocator: str, havips: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state and holder, history) of every HAVIP as one allocator's API shows them."""
    bindings: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    with system.api(allocator) as api:
        for havip_id in havips.values():
            found = ok(api.get(f"/havips/{havip_id}"))
            bindings[havip_id] = (found["state"], found["bound_instance_id"])
            items = ok(api.get(f"/havips/{havip_id}/transitions", params={"limit": 1000}))["items"]
            histories[havip_id] = sorted(
                (t["sequence"], t["from_instance_id"], t["to_instance_id"]) for t in items
            )
    return bindings, histories


@dataclass(frozen=True)
class Committed:
    """One committed transition: its claim's kernel capture time, its new holder, its commit time."""

    captured_ns: int
    to_id: str
    committed_ns: int


@dataclass
class Attribution:
    lost: list[tuple[str, int]] = field(default_factory=list)  # (HAVIP, round) moved by nothing
    duplicated: list[tuple[str, int]] = field(default_factory=list)  # (HAVIP, round) moved twice or more
    foreign: list[tuple[str, int]] = field(default_factory=list)  # a transition to another than the claimant
    wrong_holder: list[str] = field(default_factory=list)  # the last transition not to the last claimant
    caused: int = 0  # a round's claimant not the holder before it (the first round excluded)
    stray: int = 0  # transitions captured before the first round
    commits: dict[int, list[int]] = field(default_factory=dict)  # round index -> its transitions' commit times


def attribute(starts: list[int], claimants: list[str], history: dict[str, list[Committed]]) -> Attribution:
    """Each transition to the round whose burst its claim was captured in (round i: from `starts[i]` to the next
    start; `claimants[i]` sent it); per HAVIP, a round that should have moved it (its claimant not the holder
    after the rounds before) and moved nothing is lost, one that moved it more than once duplicated."""
    found = Attribution()
    for havip, transitions in history.items():
        per_round: dict[int, list[Committed]] = {}
        for t in transitions:
            index = bisect.bisect_right(starts, t.captured_ns) - 1
            if index < 0:
                found.stray += 1
                continue
            per_round.setdefault(index, []).append(t)
            found.commits.setdefault(index, []).append(t.committed_ns)
        holder: str | None = None
        for index, claimant in enumerate(claimants):
            moved = per_round.get(index, [])
            if holder != claimant:
                found.caused += index > 0
                if not moved:
                    found.lost.append((havip, index))
            if len(moved) > 1:
                found.duplicated.append((havip, index))
            found.foreign.extend((havip, index) for t in moved if t.to_id != claimant)
            if moved:
                holder = moved[-1].to_id
        if holder != claimants[-1]:
            found.wrong_holder.append(havip)
    return found


async def the_outcome(soak: Soak, system: System, events: EventLog) -> dict[str, Any]:
    db = soak.db
    ids = set(soak.havips.values())
    rows = await db.fetch(
        """SELECT havip_id::text AS havip, sequence, from_instance_id::text AS from_id,
                  to_instance_id::text AS to_id, captured_ns,
                  (extract(epoch FROM committed_at) * 1e9)::bigint AS committed_ns
           FROM binding.transitions ORDER BY havip_id, sequence"""
    )
    history: dict[str, list[asyncpg.Record]] = {h: [] for h in ids}
    for r in rows:
        history.setdefault(r["havip"], []).append(r)
    rounds = soak.rounds
    found_per_round = attribute(
        [r.sent_ns for r in rounds],
        [soak.instances[r.claimant] for r in rounds],
        {
            h: [Committed(int(r["captured_ns"]), r["to_id"], int(r["committed_ns"])) for r in found]
            for h, found in history.items()
            if h in ids
        },
    )
    # The binding rows: each HAVIP held by the last claimant.
    bound = {
        r["havip"]: r["instance"]
        for r in await db.fetch(
            "SELECT havip_id::text AS havip, instance_id::text AS instance FROM binding.bindings"
            " WHERE havip_id = ANY($1::uuid[])",
            [uuid.UUID(h) for h in ids],
        )
    }
    last = soak.instances[rounds[-1].claimant]
    wrong_rows = sorted(h for h in ids if bound.get(h) != last)
    conn = await db.connection()
    histories = await check_histories(conn)

    # Every committed event published, received once per (HAVIP, sequence), with the history's holder.
    async def outbox_empty() -> bool:
        return int(await db.fetchval("SELECT count(*) FROM binding.outbox")) == 0

    with contextlib.suppress(TimeoutError):
        await eventually(outbox_empty, timeout=STEP_TIMEOUT_S, interval=0.2, what="the binding's outbox empty")
    wanted = {(h, int(r["sequence"])) for h, found in history.items() for r in found if h in ids}
    with contextlib.suppress(TimeoutError):
        await eventually(
            lambda: wanted <= set(published(events)), timeout=60, interval=0.2, what="every transition's event"
        )
    by_sequence = published(events)
    holder_at = {(h, int(r["sequence"])): r["to_id"] for h, found in history.items() for r in found}
    events_wrong = sum(
        1
        for env in events.envelopes("havip.binding.changed")
        if (env.data["havip_id"], int(env.data["sequence"])) in holder_at
        and (env.data.get("current") or {}).get("instance_id")
        != holder_at[(env.data["havip_id"], int(env.data["sequence"]))]
    )
    # The allocators' view, from the events: the same holders and histories.
    binding_histories = {
        h: sorted((int(r["sequence"]), r["from_id"], r["to_id"]) for r in found) for h, found in history.items()
    }
    expected_bindings = {h: ("BOUND", last) for h in ids}
    views: dict[str, dict[str, int]] = {}
    wrong_in_views: set[str] = set()
    for allocator in ALLOCATORS:

        def agrees(name: str = allocator) -> bool:
            bindings, shown_histories = shown(system, name, soak.havips)
            return bindings == expected_bindings and shown_histories == binding_histories

        with contextlib.suppress(TimeoutError):
            await eventually(
                lambda: asyncio.to_thread(agrees), timeout=60, interval=1.0, what=f"{allocator}'s view"
            )
        bindings, shown_histories = await asyncio.to_thread(shown, system, allocator, soak.havips)
        wrong_in_views.update(h for h in ids if bindings[h] != expected_bindings[h])
        views[allocator] = {
            "holders_not_the_last_claimant": sum(bindings[h] != expected_bindings[h] for h in ids),
            "histories_unlike_the_binding's": sum(shown_histories[h] != binding_histories[h] for h in ids),
        }
    refused = int(await db.fetchval("SELECT count(*) FROM binding.rejected_claims"))
    return {
        "transitions": sum(len(found) for found in history.values()),
        "failovers_caused": found_per_round.caused,
        "lost": len(found_per_round.lost),
        "lost_examples": [f"{h} round {n}" for h, n in found_per_round.lost[:10]],
        "duplicated_transitions": len(found_per_round.duplicated),
        "transitions_to_another_than_the_claimant": len(found_per_round.foreign),
        "duplicated_events": sum(len(v) > 1 for v in by_sequence.values()),
        "wrong_final_holder": len(set(found_per_round.wrong_holder) | set(wrong_rows) | wrong_in_views),
        "transitions_outside_every_round": found_per_round.stray,
        "histories": histories,
        "events": {
            "received": sum(len(v) for v in by_sequence.values()),
            "transitions_without_event": len(wanted - set(by_sequence)),
            "events_without_transition": len(set(by_sequence) - set(holder_at)),
            "events_naming_another_holder": events_wrong,
        },
        "outbox_left": int(await db.fetchval("SELECT count(*) FROM binding.outbox")),
        "allocator_outbox_left": int(await db.fetchval("SELECT count(*) FROM allocator.outbox")),
        "views": views,
        "refused_claims_audited": refused,
        "per_round_commits": found_per_round.commits,
        "captured_committed": [(int(r["captured_ns"]), int(r["committed_ns"])) for r in rows],
    }


def timings(soak: Soak, faults: list[Fault], outcome: dict[str, Any]) -> dict[str, Any]:
    """Per round (burst → first / last commit), the reference (rounds no fault overlapped), per fault the
    recovery (fault → the first commit of a claim captured after it) and the slowest round while it lasted."""
    commits: dict[int, list[int]] = outcome.pop("per_round_commits")
    per_round: list[dict[str, Any]] = []
    for index, rnd in enumerate(soak.rounds):
        done = sorted(commits.get(index, []))
        first = (done[0] - rnd.sent_ns) / 1e9 if done else None
        last = (done[-1] - rnd.sent_ns) / 1e9 if done else None
        end = done[-1] if done else rnd.sent_ns + int(rnd.waited_s * 1e9)
        per_round.append({"round": rnd.number, "first_s": first, "last_s": last, "start": rnd.sent_ns, "end": end})
    failovers = per_round[1:]
    quiet = [r for r in failovers if not any(f.outstanding_during(r["start"], r["end"]) for f in faults)]
    reference = {
        "rounds": len(quiet),
        "last_commit_median_s": _median([r["last_s"] for r in quiet]),
        "last_commit_p99_s": _p(99, [r["last_s"] for r in quiet]),
        "last_commit_max_s": _max([r["last_s"] for r in quiet]),
        "first_commit_median_s": _median([r["first_s"] for r in quiet]),
    }
    transitions_captured = sorted(
        (int(c), int(k)) for c, k in outcome.pop("captured_committed")
    )  # (captured_ns, committed_ns)
    per_fault = []
    for f in faults:
        after = [c for cap, c in transitions_captured if cap >= f.at_ns]
        first = (min(after) - f.at_ns) / 1e9 if after else None
        during = [
            r["last_s"]
            for r in failovers
            if r["start"] >= f.at_ns and (f.mended_ns is None or r["start"] <= f.mended_ns)
        ]
        own = next((r for r in per_round if r["round"] == f.round), None)
        through = None if own is None or own["last_s"] is None else own["end"] - f.at_ns
        per_fault.append(
            {
                "kind": f.kind,
                "target": f.target,
                "round": f.round,
                "recovery_s": None if first is None else round(first, 3),
                "its_round_through_s": None if through is None else round(through / 1e9, 3),
                "slowest_round_while_it_lasted_s": _max(during),
                "mended_after_s": None if f.mended_ns is None else round((f.mended_ns - f.at_ns) / 1e9, 2),
                **f.notes,
                **({"error": f.error} if f.error else {}),
            }
        )
    worst: dict[str, Any] = {}
    for kind, _ in FAULTS:
        mine = [p for p in per_fault if p["kind"] == kind]
        if not mine:
            continue
        known = [p for p in mine if p["recovery_s"] is not None]
        slowest = max(known, key=lambda p: p["recovery_s"]) if known else None
        worst[kind] = {
            "count": len(mine),
            "worst_recovery_s": slowest["recovery_s"] if slowest else None,
            "worst_at_round": slowest["round"] if slowest else None,
            "median_recovery_s": _median([p["recovery_s"] for p in mine]),
            "worst_round_through_s": _max([p["its_round_through_s"] for p in mine]),
            "slowest_round_while_it_lasted_s": _max([p["slowest_round_while_it_lasted_s"] for p in mine]),
        }
    return {
        "rounds": [
            {"round": r["round"], "first_s": _r(r["first_s"]), "last_s": _r(r["last_s"])} for r in per_round
        ],
        "reference": reference,
        "faults": per_fault,
        "worst": worst,
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _known(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _median(values: list[float | None]) -> float | None:
    known = _known(values)
    return round(statistics.median(known), 3) if known else None


def _p(p: float, values: list[float | None]) -> float | None:
    known = _known(values)
    return round(percentile(known, p), 3) if known else None


def _max(values: list[float | None]) -> float | None:
    known = _known(values)
    return round(max(known), 3) if known else None


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    havips: int
    failovers: int
    fault_every_s: float
    freeze_s: float
    round_deadline_s: float
    max_faults: int
    max_minutes: float
    round_every_s: float
    reference_rounds: int
    faults: tuple[str, ...]
    rabbit_port_base: int
    pg_port_base: int


async def run(options: Options, workdir: Path) -> dict[str, Any]:
    rounds_wanted = -(-options.failovers // options.havips)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.chaos_soak", *sys.argv[1:]]),
        "machine": machine(),
        "havips": options.havips,
        "rounds_wanted": rounds_wanted,
        "fault_every_s": options.fault_every_s,
        "round_every_s": options.round_every_s,
        "freeze_s": options.freeze_s,
        "amqp_heartbeat_s": AMQP_HEARTBEAT_S,
        "lease_timeout_s": LEASE_TIMEOUT_S,
        "partitions": PARTITIONS,
    }
    os.environ["HAVIP_RABBIT_CLUSTER_PORT_BASE"] = str(options.rabbit_port_base)  # read by the cluster's script
    pg_ports = {
        "monitor": options.pg_port_base,
        "node1": options.pg_port_base + 1,
        "node2": options.pg_port_base + 2,
    }
    database = f"havip_soak_{uuid.uuid4().hex[:8]}"
    prefix = f"soak-{uuid.uuid4().hex[:6]}."
    rabbit_dir = Path(tempfile.mkdtemp(prefix="havip-soak-rabbit-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="havip-soak-pg-"))
    try:
        began = time.monotonic()
        with RabbitCluster(rabbit_dir) as rabbit, PostgresHA(pg_dir, ports=pg_ports, database=database) as pg:
            result["engines_up_s"] = round(time.monotonic() - began, 1)
            say(f"engines up in {result['engines_up_s']} s: RabbitMQ {rabbit.urls}, Postgres {pg.dsn()}")
            with Lab(SUBNET, workdir=workdir / "lab") as lab:
                for name, ip in SERVERS.items():
                    lab.add_host(name, ip)
                lab.add_capture_port("tap1")
                lab.add_capture_port("tap2")
                result.update(await with_services(options, workdir, lab, rabbit, pg, database, prefix))
    finally:
        shutil.rmtree(rabbit_dir, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)
    return result


async def with_services(
    options: Options,
    workdir: Path,
    lab: Lab,
    rabbit: RabbitCluster,
    pg: PostgresHA,
    database: str,
    prefix: str,
) -> dict[str, Any]:
    settings = {
        "HAVIP_PARTITIONS": str(PARTITIONS),
        "HAVIP_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
        "HAVIP_AMQP_HEARTBEAT_S": str(AMQP_HEARTBEAT_S),
        "HAVIP_AMQP_PREFIX": prefix,
        "HAVIP_QUOTA_PER_VPC": str(options.havips + 10),
        "HAVIP_LOG_LEVEL": "INFO",
    }
    amqp_url = ",".join(rabbit.urls)
    with System(
        pg.dsn(database),
        amqp_url,
        lab.capture_ports["tap1"].iface,
        workdir / "services",
        watcher_id=WATCHERS["arp_watcher"],
        binding_replica_id=REPLICAS["binding"],
        settings=settings,
    ) as system:
        for name, replica_id in REPLICAS.items():
            if name != "binding":
                system.start_binding(name, free_port(), replica_id=replica_id)
        system.start_watcher("twin", lab.capture_ports["tap2"].iface, free_port(), watcher_id=WATCHERS["twin"])
        system.start_allocator("allocator-2", free_port())
        await asyncio.to_thread(system.wait_ready, STEP_TIMEOUT_S)
        say("services ready: 3 binding replicas, 2 watchers, 2 allocators")
        hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in SERVERS}
        inventory = await asyncio.to_thread(register_inventory, system, "soak", SUBNET, hosts)
        instances = {name: inventory["instances"][name]["id"] for name in SERVERS}
        havips = await asyncio.to_thread(allocate, system, inventory, instances, options.havips)
        db = OnThePrimary(pg.dsn(database), timeout_s=READ_TIMEOUT_S)
        senders = {name: RawSender(lab.hosts[name].netns, lab.hosts[name].mac) for name in SERVERS}
        listener_settings = CommonSettings(
            amqp_url=amqp_url, amqp_prefix=prefix, amqp_heartbeat_s=AMQP_HEARTBEAT_S, partitions=PARTITIONS
        )
        chaos = Chaos(
            system,
            rabbit,
            pg,
            prefix,
            every_s=options.fault_every_s,
            freeze_s=options.freeze_s,
            max_faults=options.max_faults,
            kinds=options.faults,
        )
        try:

            async def known() -> bool:
                ids = [uuid.UUID(h) for h in havips.values()]
                found = await db.fetchval("SELECT count(*) FROM binding.havips WHERE id = ANY($1::uuid[])", ids)
                return int(found) == len(ids)

            await eventually(known, timeout=STEP_TIMEOUT_S, interval=0.1, what="the HAVIPs known to the binding")
            await asyncio.sleep(1.5)  # every replica follows the inventory log (its NOTIFY, or its 1 s poll)
            soak = Soak(db, senders, instances, havips, options.round_deadline_s)
            async with listening_through_failovers(listener_settings, ["havip.binding.changed"]) as events:
                first = await soak.round(0, "cvma")
                if not first.committed:
                    raise RuntimeError("the first claims were not committed")
                say(f"{options.havips} HAVIPs held by cvma; rounds begin")
                stopped = await the_rounds(soak, chaos, options)
                say("rounds done; waiting until every fault is mended")
                await chaos.mend_all()
                say("checking the outcome")
                outcome = await the_outcome(soak, system, events)
            figures = timings(soak, chaos.faults, outcome)
        finally:
            await chaos.cancel()
            for sender in senders.values():
                sender.close()
            await db.close()
    return {
        "rounds_run": len(soak.rounds) - 1,
        "stopped_early": stopped,
        "rounds_past_deadline": [r.number for r in soak.rounds if not r.committed],
        "faults_by_kind": dict(Counter(f.kind for f in chaos.faults)),
        "outcome": outcome,
        **figures,
    }


def allocate(system: System, inventory: dict[str, Any], instances: dict[str, str], n: int) -> dict[str, str]:
    """N HAVIPs from 198.18.16.0 on, the two servers their candidates, through the allocators in turn."""
    havips: dict[str, str] = {}
    for i in range(n):
        address = str(HAVIP_BASE + i)
        body = {
            "subnet_id": inventory["subnet"]["id"],
            "name": f"soak-{i}",
            "address": address,
            "candidates": list(instances.values()),
        }
        with system.api(ALLOCATORS[i % len(ALLOCATORS)]) as api:
            havips[address] = ok(api.post("/havips", json=body))["id"]
    return havips


async def the_rounds(soak: Soak, chaos: Chaos, options: Options) -> str | None:
    """Round after round until the failovers wanted were caused (or the time is up: returns why)."""
    rounds_wanted = -(-options.failovers // options.havips)
    ends = time.monotonic() + options.max_minutes * 60
    claimant = "cvma"
    last_start = 0.0
    for number in range(1, rounds_wanted + 1):
        await asyncio.sleep(max(0.0, last_start + options.round_every_s - time.monotonic()))
        last_start = time.monotonic()
        chaos.check()
        if time.monotonic() > ends:
            return f"--max-minutes {options.max_minutes} reached after {number - 1} rounds"
        claimant = "cvmb" if claimant == "cvma" else "cvma"
        if number > options.reference_rounds and chaos.due():
            await chaos.inject(number)
        done = await soak.round(number, claimant)
        if number % 10 == 0 or not done.committed or done.waited_s > 5:
            say(f"round {number}/{rounds_wanted}: {done.waited_s:.2f} s")
    return None


# ---- the report -------------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> tuple[list[str], bool]:
    out = result["outcome"]
    ref = result["reference"]
    m = result["machine"]
    good = (
        out["lost"] == 0
        and out["duplicated_transitions"] == 0
        and out["duplicated_events"] == 0
        and out["wrong_final_holder"] == 0
        and out["transitions_outside_every_round"] == 0
        and out["transitions_to_another_than_the_claimant"] == 0
        and histories_ok(out["histories"])
        and all(v == 0 for k, v in out["events"].items() if k != "received")
        and out["outbox_left"] == 0
        and all(v == 0 for view in out["views"].values() for v in view.values())
        and not result["stopped_early"]
    )
    lines = [
        f"{result['date']}  {m['host']}: {m['cores']} cores ({m['cpu']}), Python {m['python']}",
        result["command"],
        f"{result['havips']} HAVIPs, {result['rounds_run']} rounds of {result['rounds_wanted']} wanted; a fault "
        f"every {result['fault_every_s']} s; AMQP heartbeat {result['amqp_heartbeat_s']} s, lease timeout "
        f"{result['lease_timeout_s']} s; engines up in {result['engines_up_s']} s"
        + (f"; STOPPED EARLY: {result['stopped_early']}" if result["stopped_early"] else ""),
        f"failovers caused: {out['failovers_caused']} (transitions committed {out['transitions']}, the first "
        f"claims included); rounds past their deadline: {result['rounds_past_deadline'] or 'none'}",
        f"faults: {result['faults_by_kind']}",
        f"lost: {out['lost']}  duplicated: {out['duplicated_transitions']} transitions, "
        f"{out['duplicated_events']} events  wrong: {out['wrong_final_holder']}"
        + (f"  (lost: {out['lost_examples']})" if out["lost"] else ""),
        f"checks: histories {out['histories']}; events {out['events']}; outbox left {out['outbox_left']} "
        f"(allocator's {out['allocator_outbox_left']}); allocators' views {out['views']}; transitions outside "
        f"every round {out['transitions_outside_every_round']}; refused claims audited "
        f"{out['refused_claims_audited']}",
        f"reference, {ref['rounds']} rounds with no fault outstanding: burst → last commit median "
        f"{ref['last_commit_median_s']} s, p99 {ref['last_commit_p99_s']} s, max {ref['last_commit_max_s']} s; "
        f"→ first commit median {ref['first_commit_median_s']} s",
        "worst recovery per fault kind (fault → the first commit of a claim captured after it):",
    ]
    for kind, w in result["worst"].items():
        lines.append(
            f"  {kind}: {w['count']}×, worst {w['worst_recovery_s']} s (round {w['worst_at_round']}), median "
            f"{w['median_recovery_s']} s; the round right after it done (fault → its last commit) at worst "
            f"{w['worst_round_through_s']} s; slowest round while it lasted "
            f"{w['slowest_round_while_it_lasted_s']} s"
        )
    lines.append(f"verdict: {'PASS' if good else 'FAIL'}")
    return lines, good


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--havips", type=int, default=100, help="HAVIPs moved by every round (100)")
    parser.add_argument("--failovers", type=int, default=10_000, help="transitions to cause (10,000)")
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between two faults (5)")
    parser.add_argument("--freeze-s", type=float, default=15.0, help="how long a broker node stays frozen (15)")
    parser.add_argument(
        "--round-every", type=float, default=1.0, help="a round starts at least this long after the last (1 s)"
    )
    parser.add_argument(
        "--reference-rounds", type=int, default=5, help="rounds before the first fault: the reference (5)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_NAMES.values()),
        help=f"which faults, in the cycle's order, of {','.join(FAULT_NAMES.values())} (all)",
    )
    parser.add_argument("--round-deadline", type=float, default=180.0, help="a round's deadline, s (180)")
    parser.add_argument("--max-faults", type=int, default=2_000, help="at most this many faults (2,000)")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="rounds stop after this long (90)")
    parser.add_argument("--rabbit-port-base", type=int, default=25900, help="the broker cluster's ports (25900)")
    parser.add_argument("--pg-port-base", type=int, default=25850, help="the Postgres nodes' ports (25850)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs of a run that passed")
    parser.add_argument("--json", action="store_true", help="the result as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the lab's namespaces and both engines' scripts need it")
    if not 2 <= args.havips <= 4000:
        parser.error("--havips must be 2..4000")
    if not args.havips <= args.failovers <= 999 * args.havips:
        parser.error("--failovers must be 1 to 999 rounds of --havips (the API shows 1,000 transitions a page)")
    names = args.faults.split(",")
    if not set(names) <= set(FAULT_NAMES.values()):
        parser.error(f"--faults: choose among {','.join(FAULT_NAMES.values())}")
    faults = tuple(kind for kind, _ in FAULTS if FAULT_NAMES[kind] in names)
    options = Options(
        havips=args.havips,
        failovers=args.failovers,
        fault_every_s=args.fault_every,
        freeze_s=args.freeze_s,
        round_deadline_s=args.round_deadline,
        max_faults=args.max_faults,
        max_minutes=args.max_minutes,
        round_every_s=args.round_every,
        reference_rounds=args.reference_rounds,
        faults=faults,
        rabbit_port_base=args.rabbit_port_base,
        pg_port_base=args.pg_port_base,
    )
    workdir = Path(tempfile.mkdtemp(prefix="havip-bench-soak-"))  # the services' logs: kept if the run fails
    for sub in ("lab", "services"):
        (workdir / sub).mkdir()
    try:
        result = asyncio.run(interruptible(run(options, workdir)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say(f"interrupted; everything the run made was torn down; the services' logs are in {workdir}")
        return 130
    except Exception as exc:
        say("".join(traceback.format_exception(exc)).rstrip())
        say(f"the soak failed: {exc!r}; everything it made was torn down; the services' logs are in {workdir}")
        return 2
    lines, good = report(result)
    if good and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"the services' logs are in {workdir}")
    if args.json:
        say("\n".join(lines))
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(lines))
    return 0 if good else 1


async def interruptible(work: Awaitable[T]) -> T:
    """SIGTERM as Ctrl-C: the run is cancelled, so that every teardown runs."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await work


if __name__ == "__main__":
    sys.exit(main())
