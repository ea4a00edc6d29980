"""Binding replicas recovering: a replica killed, a replica frozen, a watcher killed — the next claim committed.

    .venv/bin/python -m bench.standby [--n 1000] [--rounds 5] [--freezes ROUNDS/2] [--heartbeat 5]
        [--garp-rate 500] [--parts kill,freeze,watcher] [--json]

Short mode (CI, under a minute): `--rounds 1 --n 100`. (The module keeps the name it had when one binding process
decided and the others stood by.)

What one run does, on a database and RabbitMQ virtual host of its own (bench/common.py `sandbox`):

0. `python -m services.binding migrate` (the partitions' queues), then 3 binding replicas
   (`python -m services.binding`, HAVIP_REPLICA_ID binding-1..3, the default 8 partitions, each its own metrics
   port, HAVIP_AMQP_URL with `?heartbeat=H`); the run waits until they share the partitions (3, 3, 2). The
   inventory reaches them as the allocator would send it (events on its exchange): two servers `cvma`, `cvmb` and
   N HAVIPs of 198.18.16.0 onwards; once they are in the inventory log and the replicas had time to follow it,
   `cvma` claims every HAVIP (claims published as a watcher does, one event per partition) and the run waits
   until all N are bound. Which replica decides which partition is read from the
   replicas' logs ("deciding partition N" / "handed partition N over"), checked against their
   havip_binding_partitions_owned.
1. **SIGKILL** (`--rounds` rounds): a probe HAVIP is chosen (a different partition each round), the replica
   deciding its partition is SIGKILLed, and at once `cvmb` claims the probe and one HAVIP of each other partition
   of the killed replica. The figure is the probe's transition's `committed_at` (the binding's own stamp, the
   database's clock) − the kill (the benchmark's clock, the same machine's); beside it when another replica's
   log says it took the partition's lease, and when every partition of the killed replica had its claim
   committed. The killed replica is started again, and the run waits until the partitions are shared again.
2. **SIGSTOP** (`--freezes` rounds): the same with SIGSTOP, which closes no socket. The frozen replica's lease
   session goes silent and Postgres ends it after HAVIP_LEASE_TIMEOUT_S (its locks go with it: another replica
   takes the partition); RabbitMQ keeps delivering the partition's queue to the frozen consumer until it misses
   the heartbeats and closes its connection. Both moments are read from the kernel: the frozen process's lease
   session and AMQP sockets leaving ESTABLISHED (/proc/net/tcp: the server closed them). The figure is the
   probe's `committed_at` − the SIGSTOP; what dominated is whichever of the two came last. Then SIGCONT, the run
   waits until the partitions are shared by the three again, lists the consumers of every partition's queue
   (rabbitmqctl; a consumer by a replica that does not hold the partition is a stray: made the queue's active
   consumer, it would take the partition's claims and decide none), commits one claim in every partition, and
   counts the thawed replica's write conflicts (a decision from its stale book refused by the conditional
   writes). A claim not committed within the goal + 20 s (30 s after the thaw) is reported as such.
3. **A watcher killed** (root: a closed lab on 198.18.0.0/15 from tests/lab, torn down at the end): two capture
   taps of the lab's bridge, a watcher on each (`lab/tap1`, `lab/tap2`, as tests/e2e/test_two_watchers.py runs
   them). `cvma` announces every HAVIP (one gratuitous ARP each, from a raw socket in its namespace) until it
   holds them all; then `cvmb` announces them one after another at `--garp-rate` GARPs/s — each a distinct claim,
   a change of holder — and half-way the watcher whose claims decided most of those committed by then is
   SIGKILLed. The figure: GARPs sent from the kill on, transitions committed for them, lost = the difference
   (and the same before the kill), and which watcher's claims decided them.

The parts run in the order 1, 3, 2: what a frozen replica leaves behind stays for what follows. The reference,
measured in the same run before each part: a bare publish → consume round trip through the same
RabbitMQ (bench/hops.py `round_trip`). At the end the run checks every history (sequences contiguous from 1, each
transition from the previous holder, at most one transition per claim, the binding row agreeing with the last
transition) and the `havip.binding.changed` events a consumer of the benchmark's own received (one content per
HAVIP and sequence, one for every transition).

Everything it started is stopped at the end, also on failure or Ctrl-C: processes by their process group (a
frozen one is thawed first), the lab's namespaces, the database and the virtual host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from yarl import URL

from bench.common import die_with_parent, machine, machine_cpu_s, percentile, sandbox, say
from bench.hops import round_trip
from services.binding.settings import BindingSettings
from shared import events
from shared.messaging import Broker, declare_topology
from shared.partitions import DEFAULT_PARTITIONS, partition_of
from shared.settings import CommonSettings
from tests.e2e.system import System
from tests.lab import Lab
from tests.lab.names import default_mac
from tests.lab.raw import RawSender
from tests.metrics_text import value
from tests.ports import free_port
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = DEFAULT_PARTITIONS  # the services' default: the watchers (tests/e2e/system.py) run with it too
REPLICAS = 3
SUBNET = "198.18.0.0/15"
SERVERS = {"cvma": IPv4Address("198.18.0.11"), "cvmb": IPv4Address("198.18.0.12")}
HAVIP_BASE = IPv4Address("198.18.16.0")
WATCHERS = {"arp_watcher": "lab/tap1", "twin": "lab/tap2"}  # System service name -> HAVIP_WATCHER_ID
CLAIMS_PER_EVENT = 100
DEADLINE_S = 120.0
KILL_GOAL_S = 1.0
KILL_TIMEOUT_S = 30.0  # a claim not committed by then counts as not committed
LEASE_TIMEOUT_S = BindingSettings.model_fields["lease_timeout_s"].default
PARTS = ("kill", "freeze", "watcher")
TCP_ESTABLISHED = "01"


def now_ns() -> int:
    return time.time_ns()


def since_s(start_ns: int, at_ns: int | None) -> float | None:
    return None if at_ns is None else round((at_ns - start_ns) / 1e9, 3)


# ---- the binding replicas as processes ------------------------------------------------------------------------


@dataclass
class Replica:
    """`python -m services.binding` as replica `name`, in its own process group, its JSON log in a file (one
    per start) and its metrics on a port of its own."""

    name: str
    env: dict[str, str]
    workdir: Path
    metrics_port: int = field(default_factory=free_port)
    starts: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def spawn(self) -> None:
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}.{self.starts}.log"
        env = {**self.env, "HAVIP_REPLICA_ID": self.name, "HAVIP_METRICS_PORT": str(self.metrics_port)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.binding"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signalled by group, never by name
                preexec_fn=die_with_parent,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        if self.log_path is None:
            return []
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def held(self) -> set[int]:
        """The partitions this replica decides now, by what it logged since its start."""
        held: set[int] = set()
        for line in self.lines():
            msg = str(line.get("msg", ""))
            if msg.startswith("deciding partition"):
                held.add(int(line["partition"]))
            elif msg.startswith("handed partition"):
                held.discard(int(line["partition"]))
            elif msg.startswith("partition leases lost"):
                held.clear()
        return held

    def said_after(self, start_ns: int, words: str, partition: int | None = None) -> list[dict[str, Any]]:
        """Its log lines since `start_ns` that begin with `words` (about `partition`, if given)."""
        found = []
        for line in self.lines():
            if not str(line.get("msg", "")).startswith(words) or log_ns(line) < start_ns:
                continue
            about = line.get("partition", line.get("partitions"))
            if partition is None or about == partition or (isinstance(about, list) and partition in about):
                found.append(line)
        return found

    async def metric(self, client: httpx.AsyncClient, name: str) -> float | None:
        if not self.alive():
            code = self.process and self.process.returncode
            raise RuntimeError(f"{self.name} exited with {code}: {self.log_path}")
        try:
            page = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        except httpx.TransportError:
            return None
        return value(page.text, name)

    async def running(self) -> None:
        def said() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited: {self.log_path}")
            return any(str(line.get("msg", "")).startswith("binding service running") for line in self.lines())

        await eventually(said, timeout=DEADLINE_S, interval=0.05, what=f"{self.name} running")

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    async def reap(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(self.process.wait, 15)

    async def stop(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)  # one left frozen by a failed run would never see the SIGTERM
        self.signal(signal.SIGTERM)
        try:
            await self.reap()
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            await self.reap()


def log_ns(line: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(str(line["ts"])).timestamp() * 1e9)


def replica_env(database_url: str, amqp_url: str) -> dict[str, str]:
    """The environment of a binding replica on this database and virtual host (Replica adds its id and port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    env.update(
        HAVIP_DATABASE_URL=database_url,
        HAVIP_AMQP_URL=amqp_url,
        HAVIP_METRICS_HOST="127.0.0.1",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    return env


@asynccontextmanager
async def replicas(database_url: str, amqp_url: str, workdir: Path) -> AsyncIterator[list[Replica]]:
    env = replica_env(database_url, amqp_url)
    # The partitions' queues exist before any replica consumes: what is published meanwhile waits there.
    with (workdir / "migrate.log").open("ab") as log:
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.binding", "migrate"],
            cwd=ROOT, env=env, check=True, timeout=120, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started = [Replica(f"binding-{i}", env, workdir) for i in range(1, REPLICAS + 1)]
    try:
        for replica in started:
            replica.spawn()
        for replica in started:
            await replica.running()
        yield started
    finally:
        for replica in started:
            await replica.stop()


async def shared_evenly(client: httpx.AsyncClient, group: Sequence[Replica]) -> bool:
    """Every partition decided by exactly one replica of `group`, each holding ⌊P/N⌋ or ⌈P/N⌉ of them, its
    havip_binding_partitions_owned agreeing with its log."""
    held = [r.held() for r in group]
    for replica, mine in zip(group, held, strict=True):
        if await replica.metric(client, "havip_binding_partitions_owned") != len(mine):
            return False
    low, high = PARTITIONS // len(group), -(-PARTITIONS // len(group))
    every = sorted(p for mine in held for p in mine)
    return every == list(range(PARTITIONS)) and all(low <= len(mine) <= high for mine in held)


async def wait_shared(client: httpx.AsyncClient, group: Sequence[Replica]) -> None:
    await eventually(
        lambda: shared_evenly(client, group), timeout=DEADLINE_S, interval=0.1, what="the partitions shared"
    )


def holder_of(group: Sequence[Replica], partition: int) -> Replica:
    return next(r for r in group if partition in r.held())


# ---- the inventory and the claims, as the allocator and a watcher publish them --------------------------------


@dataclass(frozen=True)
class Inventory:
    servers: dict[str, events.InstanceData]
    havips: list[events.HavipData]

    def envelopes(self) -> list[events.Envelope]:
        envs = [events.envelope("instance.registered", s, "allocator") for s in self.servers.values()]
        return envs + [events.envelope("havip.allocated", h, "allocator") for h in self.havips]

    def partition(self, havip: events.HavipData) -> int:
        return partition_of(havip.address, PARTITIONS)


def make_inventory(n: int) -> Inventory:
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    servers = {
        name: events.InstanceData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=name, private_ip=ip, mac=default_mac(ip)
        )
        for name, ip in SERVERS.items()
    }  # the lab's servers (tests/lab: the default MAC of their address), for part 3's gratuitous ARPs
    havips = [
        events.HavipData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None, address=HAVIP_BASE + i, candidates=[]
        )
        for i in range(n)
    ]
    return Inventory(servers, havips)


def claims(server: events.InstanceData, havips: Sequence[events.HavipData]) -> list[events.Envelope]:
    """`server`'s claims of `havips`, one event per partition and at most CLAIMS_PER_EVENT claims each."""
    by_partition: dict[int, list[events.ObservedClaim]] = {}
    for h in havips:
        by_partition.setdefault(partition_of(h.address, PARTITIONS), []).append(
            events.ObservedClaim(
                claim_id=uuid.uuid4(), kind="garp_request", sender_mac=server.mac, eth_src=server.mac,
                sender_ip=h.address, target_ip=h.address, captured_at=now_ns(),
            )
        )  # fmt: skip
    return [
        events.envelope(
            events.CLAIMS_EVENT,
            events.ClaimsObserved(
                watcher_id="bench", interface="bench0", claims=observed[i : i + CLAIMS_PER_EVENT]
            ),
            "arp_watcher",
        )
        for observed in by_partition.values()
        for i in range(0, len(observed), CLAIMS_PER_EVENT)
    ]


async def held_by(
    conn: asyncpg.Connection, server: events.InstanceData, havips: Sequence[events.HavipData]
) -> int:
    found = await conn.fetchval(
        "SELECT count(*) FROM binding.bindings WHERE instance_id = $1 AND havip_id = ANY($2::uuid[])",
        server.id,
        [h.id for h in havips],
    )
    return int(found)


async def wait_held(
    conn: asyncpg.Connection,
    server: events.InstanceData,
    havips: Sequence[events.HavipData],
    what: str,
    timeout_s: float = DEADLINE_S,
) -> None:
    async def all_held() -> bool:
        return await held_by(conn, server, havips) == len(havips)

    await eventually(all_held, timeout=timeout_s, interval=0.02, what=what)


async def known_everywhere(conn: asyncpg.Connection, logged: int) -> None:
    """The inventory logged (by the replica consuming binding.inventory), then time for every replica to follow
    the log: a claim decided by a replica whose book does not yet know its HAVIP would be `not_havip` — its
    drain before such a claim does not wait for the log written by another replica."""

    async def all_logged() -> bool:
        return int(await conn.fetchval("SELECT count(*) FROM binding.inventory_log")) >= logged

    await eventually(all_logged, timeout=DEADLINE_S, interval=0.05, what="the inventory logged")
    await asyncio.sleep(1.5)  # each replica follows at the log's NOTIFY, or within its 1 s poll


async def committed_after(
    conn: asyncpg.Connection, havip: events.HavipData, server: events.InstanceData, after_ns: int
) -> int | None:
    """The `committed_at` (ns) of the transition of `havip` to `server` committed since `after_ns`, if any."""
    at: datetime | None = await conn.fetchval(
        "SELECT max(committed_at) FROM binding.transitions"
        " WHERE havip_id = $1 AND to_instance_id = $2 AND captured_ns >= $3",
        havip.id,
        server.id,
        after_ns,
    )
    return None if at is None else int(at.timestamp() * 1e9)


class Probes:
    """HAVIPs not moved yet, taken one at a time from the partition asked for: each round moves fresh ones."""

    def __init__(self, inventory: Inventory) -> None:
        self._unused: dict[int, list[events.HavipData]] = {}
        for h in inventory.havips:
            self._unused.setdefault(inventory.partition(h), []).append(h)

    def take(self, partition: int) -> events.HavipData:
        left = self._unused.get(partition)
        if not left:
            raise RuntimeError(f"no HAVIP left in partition {partition}: use a larger --n")
        return left.pop(0)


# ---- what the kernel says about a frozen process's sockets -----------------------------------------------------


def tcp_table() -> dict[int, tuple[int, int, str]]:
    """inode → (local port, remote port, state) of every TCP socket of this network namespace."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                table[int(f[9])] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3])
    return table


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def sockets_to(pid: int, remote_port: int, local_ports: set[int] | None = None) -> set[int]:
    """The inodes of `pid`'s established TCP connections to `remote_port` (from `local_ports`, if given)."""
    table = tcp_table()
    return {
        inode
        for inode in socket_inodes(pid)
        if inode in table
        and table[inode][1] == remote_port
        and table[inode][2] == TCP_ESTABLISHED
        and (local_ports is None or table[inode][0] in local_ports)
    }


@asynccontextmanager
async def closed_by_peer(watched: dict[str, set[int]]) -> AsyncIterator[dict[str, int]]:
    """While inside: when (ns) the first socket of each named set left ESTABLISHED — for a frozen process, only
    its peer can have closed it (CLOSE_WAIT) — polled every 10 ms."""
    seen: dict[str, int] = {}

    async def poll() -> None:
        while len(seen) < len(watched):
            table = tcp_table()
            at = now_ns()
            for name, inodes in watched.items():
                if name not in seen and any(table.get(i, (0, 0, ""))[2] != TCP_ESTABLISHED for i in inodes):
                    seen[name] = at
            await asyncio.sleep(0.01)

    task = asyncio.create_task(poll(), name="sockets of the frozen replica")
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def negotiated_heartbeats(local_ports: set[int]) -> list[int]:
    """The AMQP heartbeat timeouts RabbitMQ negotiated with the connections from these local ports (rabbitmqctl:
    the connection's name is "client address:port -> server address:port")."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "name", "timeout"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = []
    for line in listed.stdout.splitlines():
        name, _, timeout = line.rpartition("\t")
        client = name.split(" -> ")[0]
        if client.rpartition(":")[2].isdigit() and int(client.rpartition(":")[2]) in local_ports:
            found.append(int(timeout))
    return found


# ---- references and checks -------------------------------------------------------------------------------------


async def reference(amqp_url: str) -> dict[str, float]:
    """The bare publish → consume round trip now (ms), and how busy the machine was over half a second."""
    busy0, total0 = machine_cpu_s()
    await asyncio.sleep(0.5)
    busy1, total1 = machine_cpu_s()
    async with round_trip(amqp_url) as once:
        for _ in range(20):  # warm-up
            await once()
        trips = [(await once())[0] for _ in range(100)]
    return {
        "round_trip_p50_ms": round(percentile(trips, 50) * 1000, 2),
        "round_trip_p99_ms": round(percentile(trips, 99) * 1000, 2),
        "machine_busy": round((busy1 - busy0) / max(total1 - total0, 1e-9), 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


@asynccontextmanager
async def binding_events(amqp_url: str) -> AsyncIterator[dict[tuple[str, int], set[tuple[str | None, str]]]]:
    """Every havip.binding.changed published while inside, by (HAVIP, sequence): the contents received."""
    received: dict[tuple[str, int], set[tuple[str | None, str]]] = {}
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, CommonSettings(amqp_url=amqp_url))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "havip.binding.changed")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            data = json.loads(message.body)["data"]
            current = data.get("current") or {}
            content = (current.get("instance_id"), str(data["committed_at"]))
            received.setdefault((data["havip_id"], int(data["sequence"])), set()).add(content)
            await message.ack()

        await queue.consume(on_message)
        yield received
    finally:
        await connection.close()


HISTORY_CHECK = """
    WITH t AS (
        SELECT havip_id, sequence, from_instance_id, to_instance_id, reason,
               row_number() OVER w AS rn, lag(to_instance_id) OVER w AS previous_holder
        FROM binding.transitions WINDOW w AS (PARTITION BY havip_id ORDER BY sequence))
    SELECT count(*) AS transitions,
           count(*) FILTER (WHERE sequence <> rn) AS not_contiguous,
           count(*) FILTER (WHERE rn > 1 AND from_instance_id IS DISTINCT FROM previous_holder) AS not_from_holder,
           count(*) FILTER (WHERE reason = 'claim' AND from_instance_id IS NOT DISTINCT FROM to_instance_id)
               AS to_the_holder
    FROM t"""
SAME_CLAIM_TWICE = """
    SELECT count(*) FROM (SELECT 1 FROM binding.transitions WHERE reason = 'claim'
                          GROUP BY havip_id, captured_ns, to_instance_id HAVING count(*) > 1) twice"""
ROWS_DISAGREEING = """
    SELECT count(*) FROM binding.bindings b
    JOIN LATERAL (SELECT sequence, to_instance_id FROM binding.transitions t WHERE t.havip_id = b.havip_id
                  ORDER BY sequence DESC LIMIT 1) last ON true
    WHERE b.sequence <> last.sequence OR b.instance_id IS DISTINCT FROM last.to_instance_id"""


async def check_histories(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(HISTORY_CHECK)
    assert row is not None
    return {
        **{k: int(v) for k, v in row.items()},
        "same_claim_twice": int(await conn.fetchval(SAME_CLAIM_TWICE)),
        "binding_rows_disagreeing": int(await conn.fetchval(ROWS_DISAGREEING)),
    }


def histories_ok(found: dict[str, int]) -> bool:
    return all(v == 0 for k, v in found.items() if k != "transitions")


async def check_events(
    conn: asyncpg.Connection, received: dict[tuple[str, int], set[tuple[str | None, str]]]
) -> dict[str, int]:
    """Once the outbox is drained: every transition's event received, none with two contents."""
    with contextlib.suppress(TimeoutError):
        await eventually(
            lambda: _outbox_empty(conn), timeout=DEADLINE_S, interval=0.1, what="the binding's outbox drained"
        )
    await asyncio.sleep(0.5)  # the last ones on their way to the benchmark's queue
    rows = await conn.fetch("SELECT havip_id, sequence FROM binding.transitions")
    keys = {(str(r["havip_id"]), int(r["sequence"])) for r in rows}
    return {
        "events_received": len(received),
        "transitions_without_event": len(keys - set(received)),
        "events_with_two_contents": sum(len(contents) > 1 for contents in received.values()),
        "outbox_left": int(await conn.fetchval("SELECT count(*) FROM binding.outbox")),
    }


async def _outbox_empty(conn: asyncpg.Connection) -> bool:
    return int(await conn.fetchval("SELECT count(*) FROM binding.outbox")) == 0


# ---- the run -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    conn: asyncpg.Connection
    publisher: Broker
    client: httpx.AsyncClient
    group: list[Replica]
    inventory: Inventory
    probes: Probes
    amqp_url: str
    freeze_goal_s: float = 16.0  # 3 × the negotiated AMQP heartbeat timeout + 1 s

    @property
    def vhost(self) -> str:
        return URL(self.amqp_url).path.lstrip("/")

    @property
    def cvma(self) -> events.InstanceData:
        return self.inventory.servers["cvma"]

    @property
    def cvmb(self) -> events.InstanceData:
        return self.inventory.servers["cvmb"]

    async def move(self, havips: Sequence[events.HavipData], to: events.InstanceData) -> None:
        await self.publisher.publish_many(claims(to, havips))


async def commits(
    run: Run, havips: Sequence[events.HavipData], since_ns: int, timeout_s: float, interval_s: float = 0.005
) -> dict[uuid.UUID, int]:
    """When (`committed_at`, ns) each HAVIP's transition to cvmb since `since_ns` was committed: all of them, or
    those committed within `timeout_s` (a claim never decided is a figure too, not a crash of the run)."""
    committed: dict[uuid.UUID, int] = {}

    async def all_committed() -> bool:
        for h in havips:
            if h.id not in committed:
                at = await committed_after(run.conn, h, run.cvmb, since_ns)
                if at is not None:
                    committed[h.id] = at
        return len(committed) == len(havips)

    with contextlib.suppress(TimeoutError):
        await eventually(all_committed, timeout=timeout_s, interval=interval_s, what="the claims committed")
    return committed


async def sigkill_round(run: Run, round_: int) -> dict[str, Any]:
    await wait_shared(run.client, run.group)
    partition = round_ % PARTITIONS
    probe = run.probes.take(partition)
    victim = holder_of(run.group, partition)
    others = [run.probes.take(p) for p in sorted(victim.held() - {partition})]
    killed_ns = now_ns()
    victim.signal(signal.SIGKILL)
    await run.move([probe], run.cvmb)
    await run.move(others, run.cvmb)
    committed = await commits(run, [probe, *others], killed_ns, timeout_s=KILL_TIMEOUT_S)
    survivors = [r for r in run.group if r is not victim]
    taken = [line for r in survivors for line in r.said_after(killed_ns, "deciding partition", partition)]
    read = [line for r in survivors for line in r.said_after(killed_ns, "partitions taken over", partition)]
    result = {
        "partition": partition,
        "killed": victim.name,
        "its_partitions": len(others) + 1,
        "kill_to_commit_s": since_s(killed_ns, committed.get(probe.id)),
        "kill_to_lease_taken_s": since_s(killed_ns, min((log_ns(x) for x in taken), default=None)),
        "kill_to_bindings_read_s": since_s(killed_ns, min((log_ns(x) for x in read), default=None)),
        "kill_to_all_its_partitions_committed_s": since_s(killed_ns, max(committed.values(), default=None))
        if len(committed) == len(others) + 1
        else None,
    }
    say(f"SIGKILL round {round_ + 1}: {json.dumps(result)}")
    await victim.reap()
    victim.spawn()
    await victim.running()
    await wait_shared(run.client, run.group)
    return result


async def write_conflicts(run: Run) -> float:
    """havip_binding_write_conflicts_total summed over the replicas (since each one's start)."""
    return sum([(await r.metric(run.client, "havip_binding_write_conflicts_total")) or 0.0 for r in run.group])


def partition_consumers(vhost: str, group: Sequence[Replica]) -> dict[int, list[str]]:
    """partition → the replicas with a consumer on its queue, from rabbitmqctl (a consumer's channel is named
    after its connection's client address and port) and the replicas' sockets (/proc)."""

    def listed(*args: str) -> list[list[str]]:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args, "-p", vhost, "--no-table-headers"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return [line.split("\t") for line in done.stdout.splitlines() if line]

    ports = {
        pid: int(name.split(" -> ")[0].rpartition(":")[2]) for pid, name in listed("list_channels", "pid", "name")
    }
    table = tcp_table()
    replica_of = {table[i][0]: r.name for r in group if r.alive() for i in socket_inodes(r.pid) if i in table}
    found: dict[int, list[str]] = {}
    for queue, channel in listed("list_consumers", "queue_name", "channel_pid"):
        if queue.startswith("binding.partition."):
            who = replica_of.get(ports.get(channel, 0), "another process")
            found.setdefault(int(queue.rpartition(".")[2]), []).append(who)
    return dict(sorted(found.items()))


def stray_consumers(vhost: str, group: Sequence[Replica]) -> dict[str, list[str]]:
    """Consumers on a partition's queue by a replica that does not hold the partition: should RabbitMQ make one
    of them the queue's active consumer, the partition's claims go to a replica that does not decide them."""
    held = {r.name: r.held() for r in group}
    return {
        f"binding.partition.{p}": [who for who in consumers if p not in held.get(who, set())]
        for p, consumers in partition_consumers(vhost, group).items()
        if any(p not in held.get(who, set()) for who in consumers)
    }


async def sigstop_round(run: Run, round_: int, database_url: str) -> dict[str, Any]:
    await wait_shared(run.client, run.group)
    partition = (round_ * 3 + 1) % PARTITIONS  # other partitions than the SIGKILL rounds' first ones
    probe = run.probes.take(partition)
    victim = holder_of(run.group, partition)
    others = [run.probes.take(p) for p in sorted(victim.held() - {partition})]
    conflicts_before = await write_conflicts(run)
    pg_port = URL(database_url).port or 5432
    amqp_port = URL(run.amqp_url).port or 5672
    lease_ports = {
        int(r["client_port"])
        for r in await run.conn.fetch(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = 'havip-binding-leases'"
            " AND datname = current_database() AND client_port IS NOT NULL"
        )
    }
    watched = {
        "lease_session": sockets_to(victim.pid, pg_port, lease_ports),
        "amqp_connection": sockets_to(victim.pid, amqp_port),
    }
    if not all(watched.values()):
        raise RuntimeError(f"{victim.name}'s lease session or AMQP connection not found: {watched}")
    strays_before = stray_consumers(run.vhost, run.group)
    async with closed_by_peer(watched) as closed:
        stopped_ns = now_ns()
        victim.signal(signal.SIGSTOP)
        try:
            await run.move([probe], run.cvmb)
            await run.move(others, run.cvmb)
            committed = await commits(
                run, [probe, *others], stopped_ns, timeout_s=run.freeze_goal_s + 20, interval_s=0.01
            )
            with contextlib.suppress(TimeoutError):  # both closed by now, normally
                await eventually(lambda: len(closed) == 2, timeout=5, what="both sockets closed")
        finally:
            victim.signal(signal.SIGCONT)
            thawed_ns = now_ns()
    survivors = [r for r in run.group if r is not victim]
    taken = [line for r in survivors for line in r.said_after(stopped_ns, "deciding partition", partition)]
    lease_taken_s = since_s(stopped_ns, min((log_ns(x) for x in taken), default=None))
    amqp_closed_s = since_s(stopped_ns, closed.get("amqp_connection"))
    dominated = (
        "RabbitMQ dropping the frozen consumer"
        if (amqp_closed_s or math.inf) > (lease_taken_s or math.inf)
        else "the lease timeout"
    )
    # Thawed: it finds its lease session gone, stops deciding, takes a share again.
    await wait_shared(run.client, run.group)
    strays_after = stray_consumers(run.vhost, run.group)
    everywhere = [run.probes.take(p) for p in range(PARTITIONS)]
    moved_ns = now_ns()
    await run.move(everywhere, run.cvmb)
    decided = await commits(run, everywhere, moved_ns, timeout_s=30, interval_s=0.02)
    conflicts_after = await write_conflicts(run)
    result = {
        "partition": partition,
        "frozen": victim.name,
        "its_partitions": len(others) + 1,
        "stop_to_commit_s": since_s(stopped_ns, committed.get(probe.id)),
        "stop_to_lease_session_ended_s": since_s(stopped_ns, closed.get("lease_session")),
        "stop_to_lease_taken_s": lease_taken_s,
        "stop_to_amqp_connection_closed_s": amqp_closed_s,
        "stop_to_all_its_partitions_committed_s": since_s(stopped_ns, max(committed.values(), default=None))
        if len(committed) == len(others) + 1
        else None,
        "its_partitions_committed": len(committed),
        "dominated_by": dominated,
        "frozen_for_s": since_s(stopped_ns, thawed_ns),
        "thawed_lost_its_leases": bool(victim.said_after(thawed_ns, "partition leases lost")),
        "thawed_write_conflicts_logged": len(victim.said_after(thawed_ns, "another process")),
        "write_conflicts_metric": conflicts_after - conflicts_before,
        "stray_consumers_before": strays_before,
        "stray_consumers_after_thaw": strays_after,
        "partitions_decided_after_thaw": len(decided),
        "histories": await check_histories(run.conn),
    }
    say(f"SIGSTOP round {round_ + 1}: {json.dumps(result)}")
    return result


async def watcher_part(
    run: Run, lab: Lab, database_url: str, amqp_url: str, workdir: Path, garp_rate: int
) -> dict[str, Any]:
    await wait_shared(run.client, run.group)
    tap1, tap2 = lab.capture_ports["tap1"].iface, lab.capture_ports["tap2"].iface
    system = System(database_url, amqp_url, tap1, workdir, watcher_id=WATCHERS["arp_watcher"])
    senders = {name: RawSender(lab.hosts[name].netns, lab.hosts[name].mac) for name in SERVERS}
    try:
        system.start_service("arp_watcher")
        system.start_watcher("twin", tap2, free_port(), watcher_id=WATCHERS["twin"])
        system.wait_ready(names=tuple(WATCHERS))
        havips = run.inventory.havips
        # cvma announces every HAVIP (some moved to cvmb by the rounds before) until it holds them all.
        for attempt in range(3):
            senders["cvma"].send([senders["cvma"].garp(h.address) for h in havips])
            try:
                await wait_held(run.conn, run.cvma, havips, "cvma holds every HAVIP (its GARPs)", timeout_s=15)
                break
            except TimeoutError:
                if attempt == 2:
                    raise
        sender = senders["cvmb"]
        frames = [sender.garp(h.address) for h in havips]
        kill_at = len(frames) // 2
        started_ns = now_ns()
        killed_ns = 0
        victim = ""
        sent = 0
        while sent < len(frames):
            if sent >= kill_at and not killed_ns:
                # The watcher whose claims won most often so far: the one the binding relied on.
                leader = await run.conn.fetchval(
                    "SELECT watcher_id FROM binding.transitions WHERE to_instance_id = $1 AND captured_ns >= $2"
                    " GROUP BY watcher_id ORDER BY count(*) DESC, max(committed_at) DESC LIMIT 1",
                    run.cvmb.id,
                    started_ns,
                )
                victim = next((n for n, wid in WATCHERS.items() if wid == leader), "arp_watcher")
                killed_ns = now_ns()
                system.kill(victim)  # SIGKILL to its process group
                say(f"watcher {WATCHERS[victim]} SIGKILLed after {sent} of {len(frames)} GARPs")
            end = min(sent + max(1, garp_rate // 200), len(frames))  # 5 ms of GARPs at a time
            if sent < kill_at:
                end = min(end, kill_at)  # the kill falls between two GARPs, after exactly `kill_at` of them
            sender.send(frames[sent:end])
            sent = end
            await asyncio.sleep(max(0.0, started_ns / 1e9 + sent / garp_rate - time.time()))
        sent_ns = now_ns()
        before, after = havips[:kill_at], havips[kill_at:]

        async def moved(group: Sequence[events.HavipData]) -> int:
            found = await run.conn.fetchval(
                "SELECT count(DISTINCT havip_id) FROM binding.transitions"
                " WHERE to_instance_id = $1 AND captured_ns >= $2 AND havip_id = ANY($3::uuid[])",
                run.cvmb.id,
                started_ns,
                [h.id for h in group],
            )
            return int(found)

        with contextlib.suppress(TimeoutError):  # what never arrives is the figure: lost
            await eventually(
                lambda: _all_moved(moved, havips), timeout=30, interval=0.05, what="every GARP's transition"
            )
        committed_before, committed_after_kill = await moved(before), await moved(after)
        decided = {
            "before": await decided_by(run, started_ns, before),
            "after": await decided_by(run, started_ns, after),
        }
        result = {
            "garps_sent": len(frames),
            "garp_rate_per_s": garp_rate,
            "sent_in_s": round((sent_ns - started_ns) / 1e9, 3),
            "killed": WATCHERS[victim],
            "survivor": next(wid for name, wid in WATCHERS.items() if name != victim),
            "killed_after_s": round((killed_ns - started_ns) / 1e9, 3),
            "sent_before_kill": len(before),
            "committed_before_kill": committed_before,
            "sent_from_kill_on": len(after),
            "committed_from_kill_on": committed_after_kill,
            "lost": len(frames) - committed_before - committed_after_kill,
            "before_kill_decided_by": decided["before"][0],
            "from_kill_on_decided_by": decided["after"][0],
            "before_kill_capture_to_commit_ms": decided["before"][1],
            "from_kill_on_capture_to_commit_ms": decided["after"][1],
        }
        say(f"watcher killed: {json.dumps(result)}")
        return result
    finally:
        for s in senders.values():
            s.close()
        system.stop()


async def decided_by(
    run: Run, since_ns: int, havips: Sequence[events.HavipData]
) -> tuple[dict[str, int], dict[str, float]]:
    """Of these HAVIPs' transitions to cvmb since `since_ns`: how many each watcher's claim decided, and their
    kernel capture → `committed_at` (ms)."""
    rows = await run.conn.fetch(
        "SELECT watcher_id, captured_ns, committed_at FROM binding.transitions"
        " WHERE to_instance_id = $1 AND captured_ns >= $2 AND havip_id = ANY($3::uuid[])",
        run.cvmb.id,
        since_ns,
        [h.id for h in havips],
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["watcher_id"]] = counts.get(r["watcher_id"], 0) + 1
    latencies = [r["committed_at"].timestamp() - r["captured_ns"] / 1e9 for r in rows]
    return counts, {
        "p50": round(percentile(latencies, 50) * 1000, 2),
        "max": round(max(latencies, default=math.nan) * 1000, 2),
    }


async def _all_moved(moved: Callable[[Sequence[events.HavipData]], Awaitable[int]], havips: Sequence[Any]) -> bool:
    return await moved(havips) == len(havips)


@contextlib.contextmanager
def maybe_lab(needed: bool, workdir: Path) -> Iterator[Lab | None]:
    if not needed:
        yield None
        return
    with Lab(SUBNET, workdir=workdir) as lab:
        for name, ip in SERVERS.items():
            lab.add_host(name, str(ip))
        lab.add_capture_port("tap1")
        lab.add_capture_port("tap2")
        yield lab


async def run(
    n: int, rounds: int, freezes: int, heartbeat: int, garp_rate: int, parts: set[str], workdir: Path
) -> dict[str, Any]:
    inventory = make_inventory(n)
    result: dict[str, Any] = {
        "n": n,
        "replicas": REPLICAS,
        "partitions": PARTITIONS,
        "amqp_heartbeat_requested_s": heartbeat,
        "lease_timeout_s": LEASE_TIMEOUT_S,
        "lease_interval_s": BindingSettings.model_fields["lease_interval_s"].default,
        "machine": machine(),
    }
    async with sandbox("standby") as box:
        replica_amqp = str(URL(box.amqp_url).update_query(heartbeat=heartbeat))
        with maybe_lab("watcher" in parts, workdir / "lab") as lab:
            async with (
                replicas(box.database_url, replica_amqp, workdir) as group,
                binding_events(box.amqp_url) as received,
            ):
                publisher = Broker(CommonSettings(amqp_url=box.amqp_url, publish_timeout_s=60), "bench")
                await publisher.connect()
                conn = await asyncpg.connect(box.database_url)
                try:
                    async with httpx.AsyncClient(timeout=5.0) as client:
                        here = Run(conn, publisher, client, group, inventory, Probes(inventory), box.amqp_url)
                        await wait_shared(client, group)
                        say(f"{REPLICAS} replicas share {PARTITIONS} partitions; {n} HAVIPs, cvma claims them")
                        envs = inventory.envelopes()
                        for i in range(0, len(envs), 1000):
                            await publisher.publish_many(envs[i : i + 1000])
                        await known_everywhere(conn, len(envs))
                        await here.move(inventory.havips, here.cvma)
                        await wait_held(conn, here.cvma, inventory.havips, f"{n} HAVIPs held by cvma")
                        amqp_port = URL(box.amqp_url).port or 5672
                        ports = {tcp_table()[i][0] for r in group for i in sockets_to(r.pid, amqp_port)}
                        result["amqp_heartbeat_negotiated_s"] = sorted(set(negotiated_heartbeats(ports)))
                        here.freeze_goal_s = 3 * max(result["amqp_heartbeat_negotiated_s"], default=heartbeat) + 1
                        if "kill" in parts:
                            result["kill_reference"] = await reference(box.amqp_url)
                            result["kill"] = [await sigkill_round(here, r) for r in range(rounds)]
                        if lab is not None:
                            result["watcher_reference"] = await reference(box.amqp_url)
                            result["watcher"] = await watcher_part(
                                here, lab, box.database_url, box.amqp_url, workdir / "services", garp_rate
                            )
                            await here.move(inventory.havips, here.cvma)  # cvmb holds them all now
                            await wait_held(conn, here.cvma, inventory.havips, f"{n} HAVIPs back to cvma")
                        if "freeze" in parts:  # last: what a frozen replica leaves behind stays
                            result["freeze_reference"] = await reference(box.amqp_url)
                            result["freeze"] = [
                                await sigstop_round(here, r, box.database_url) for r in range(freezes)
                            ]
                        result["histories"] = await check_histories(conn)
                        result["events"] = await check_events(conn, received)
                finally:
                    await conn.close()
                    await publisher.close()
    return result


def summary(values: Sequence[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(known), 3), "max": round(max(known), 3)}


def within(values: Sequence[float | None], goal: float) -> bool:
    """Every value known (a claim committed) and at most `goal`."""
    return bool(values) and all(v is not None and v <= goal for v in values)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(result: dict[str, Any]) -> tuple[list[str], bool]:
    """The result as text, and whether every goal and check held."""
    out: list[str] = []
    good = True
    negotiated = result["amqp_heartbeat_negotiated_s"]
    out.append(
        f"binding replicas recovering: {result['n']} HAVIPs, {result['replicas']} replicas, "
        f"{result['partitions']} partitions; lease poll {result['lease_interval_s']} s, lease timeout "
        f"{result['lease_timeout_s']} s; AMQP heartbeat asked {result['amqp_heartbeat_requested_s']} s, "
        f"negotiated {negotiated} s"
    )

    def ref(key: str) -> str:
        r = result[key]
        return (
            f"reference: publish → consume round trip p50 {r['round_trip_p50_ms']} ms, "
            f"p99 {r['round_trip_p99_ms']} ms (machine {r['machine_busy']:.0%} busy, "
            f"load average {r['load_average_1m']})"
        )

    if "kill" in result:
        rounds = result["kill"]
        figure = summary([r["kill_to_commit_s"] for r in rounds])
        ok = within([r["kill_to_commit_s"] for r in rounds], KILL_GOAL_S)
        good &= ok
        out.append(
            f"1. SIGKILL of the replica deciding the probe's partition → the partition's first claim committed: "
            f"{[r['kill_to_commit_s'] for r in rounds]} s; median {figure['median']} s, max {figure['max']} s "
            f"(goal ≤ {KILL_GOAL_S} s: {verdict(ok)})"
        )
        for name, key in (
            ("lease taken by another replica (its log)", "kill_to_lease_taken_s"),
            ("the partition's bindings read (its log)", "kill_to_bindings_read_s"),
            (
                "a claim committed in every partition of the killed replica",
                "kill_to_all_its_partitions_committed_s",
            ),
        ):
            values = [r[key] for r in rounds]
            out.append(
                f"   {name}: {values} s; median {summary(values)['median']} s, max {summary(values)['max']} s"
            )
        out.append("   " + ref("kill_reference"))
    if "freeze" in result:
        rounds = result["freeze"]
        heartbeat = max(negotiated, default=result["amqp_heartbeat_requested_s"])
        goal = 3 * heartbeat + 1
        figure = summary([r["stop_to_commit_s"] for r in rounds])
        ok = within([r["stop_to_commit_s"] for r in rounds], goal)
        clean = all(
            histories_ok(r["histories"])
            and not r["stray_consumers_after_thaw"]
            and r["partitions_decided_after_thaw"] == result["partitions"]
            for r in rounds
        )
        good &= ok and clean
        out.append(
            f"2. SIGSTOP of that replica → the partition's first claim committed: "
            f"{[r['stop_to_commit_s'] for r in rounds]} s; median {figure['median']} s, max {figure['max']} s "
            f"(goal ≤ 3 × {heartbeat} + 1 = {goal} s: {verdict(ok)})"
        )
        for r in rounds:
            thawed_ok = not r["stray_consumers_after_thaw"] and r["partitions_decided_after_thaw"] == PARTITIONS
            out.append(
                f"   {r['frozen']}: lease session ended by Postgres {r['stop_to_lease_session_ended_s']} s, lease "
                f"taken {r['stop_to_lease_taken_s']} s, AMQP connection closed by RabbitMQ "
                f"{r['stop_to_amqp_connection_closed_s']} s, committed {r['stop_to_commit_s']} s (all its "
                f"partitions {r['stop_to_all_its_partitions_committed_s']} s) — dominated by {r['dominated_by']}"
            )
            out.append(
                f"   thawed after {r['frozen_for_s']} s: leases found lost {r['thawed_lost_its_leases']}; write "
                f"conflicts {r['write_conflicts_metric']:.0f} ({r['thawed_write_conflicts_logged']} logged by "
                f"it); a claim in every partition then: {r['partitions_decided_after_thaw']} of "
                f"{result['partitions']} committed within 30 s"
            )
            out.append(
                f"   consumers on partitions their replica does not hold: before the stop "
                f"{r['stray_consumers_before'] or 'none'}, after the thaw "
                f"{r['stray_consumers_after_thaw'] or 'none'}: "
                f"{verdict(thawed_ok)}"
            )
            out.append(f"   histories then {r['histories']}: {verdict(histories_ok(r['histories']))}")
        out.append("   " + ref("freeze_reference"))
    if "watcher" in result:
        w = result["watcher"]
        ok = w["lost"] == 0
        good &= ok
        out.append(
            f"3. watcher {w['killed']} SIGKILLed after {w['killed_after_s']} s of {w['garps_sent']} GARPs at "
            f"{w['garp_rate_per_s']}/s (each a change of holder), {w['survivor']} alive: from the kill on "
            f"{w['sent_from_kill_on']} sent, {w['committed_from_kill_on']} committed; before it "
            f"{w['sent_before_kill']} sent, {w['committed_before_kill']} committed; lost {w['lost']} "
            f"(goal 0: {verdict(ok)})"
        )
        out.append(
            f"   decided by: before the kill {w['before_kill_decided_by']}, from it on "
            f"{w['from_kill_on_decided_by']}; capture → commit before {w['before_kill_capture_to_commit_ms']} ms, "
            f"from the kill on {w['from_kill_on_capture_to_commit_ms']} ms"
        )
        out.append("   " + ref("watcher_reference"))
    histories, sent_events = result["histories"], result["events"]
    clean = (
        histories_ok(histories)
        and sent_events["transitions_without_event"] == 0
        and sent_events["events_with_two_contents"] == 0
    )
    good &= clean
    out.append(f"checks: histories {histories}; events {sent_events}: {verdict(clean)}")
    return out, good


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standby", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="HAVIPs (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="SIGKILL rounds (default 5)")
    parser.add_argument("--freezes", type=int, default=None, help="SIGSTOP rounds (default: half the rounds, ≥ 1)")
    parser.add_argument("--heartbeat", type=int, default=5, help="AMQP heartbeat the replicas ask for, s (5)")
    parser.add_argument("--garp-rate", type=int, default=500, help="GARPs/s of the watcher part (500)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts, of {','.join(PARTS)} (all)")
    parser.add_argument("--json", action="store_true", help="the result as JSON")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: choose among {','.join(PARTS)}")
    if args.n < 4 * PARTITIONS:
        parser.error(f"--n must be at least {4 * PARTITIONS}: each round moves HAVIPs not moved before")
    if "watcher" in parts and os.geteuid() != 0:
        parser.error("the watcher part builds a lab of network namespaces: run as root, or leave it out (--parts)")
    freezes = args.freezes if args.freezes is not None else max(1, math.ceil(args.rounds / 2))
    workdir = Path(tempfile.mkdtemp(prefix="havip-bench-standby-"))  # the processes' logs: kept if the run fails
    for sub in ("lab", "services"):
        (workdir / sub).mkdir()
    try:
        result = asyncio.run(run(args.n, args.rounds, freezes, args.heartbeat, args.garp_rate, parts, workdir))
    except BaseException:
        say(f"the processes' logs are in {workdir}")
        raise
    lines, good = report(result)
    if good:
        shutil.rmtree(workdir)
    else:
        say(f"the processes' logs are in {workdir}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
