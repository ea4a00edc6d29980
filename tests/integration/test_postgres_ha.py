"""A Postgres primary with a synchronous standby under pg_auto_failover (tests/clusters/postgres.py): when the
primary's whole node is killed, the monitor promotes the standby by itself, a client that reconnects with the
multi-host DSN writes on it, and no commit the client saw acknowledged is lost; the same across a planned
switchover.

The writer commits one row per key at a steady rate, each key once, with an idempotent insert (ON CONFLICT DO
NOTHING on the key). A commit that fails mid-flight has an unknown outcome (the server may have committed it and
died before answering); after reconnecting, the writer resolves it by inserting the same key again: the insert
finds the row (it had committed) or writes it (it had not), never both."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import pytest

from tests.clusters.postgres import PostgresHA
from tests.waiting import eventually

RATE = 100.0  # commits per second
RECONNECT_S = 0.1  # pause between two attempts to connect
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0  # a commit stuck waiting for a standby that is gone becomes an error, hence in doubt
DEADLINE_S = 120.0  # for a failover or a switchover on 2 busy cores (measured here: seconds)

CLIENT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Ack:
    at: float  # time.monotonic() when the commit was acknowledged
    port: int  # the node that acknowledged it


@dataclass
class Writer:
    """One row per key, `RATE` a second, over the multi-host DSN; after any error it reconnects (reaching
    whichever node is writable) and first resolves the keys whose commit was in doubt."""

    dsn: str
    table: str
    acked: dict[int, Ack] = field(default_factory=dict)
    in_doubt: list[int] = field(default_factory=list)  # failed mid-commit, not resolved yet
    had_committed: list[int] = field(default_factory=list)  # in doubt, found committed on resolution
    had_not_committed: list[int] = field(default_factory=list)  # in doubt, absent, written on resolution
    errors: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        insert = f"INSERT INTO {self.table} (key) VALUES ($1) ON CONFLICT (key) DO NOTHING RETURNING key"
        conn: asyncpg.Connection | None = None
        port = 0
        key = 0
        interval = 1 / RATE
        next_at = time.monotonic()
        try:
            while not (self.stopping.is_set() and not self.in_doubt):
                if conn is None:
                    try:
                        conn = await asyncpg.connect(
                            self.dsn, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S
                        )
                        port = await conn.fetchval("SELECT inet_server_port()")
                    except CLIENT_ERRORS as exc:
                        self.errors.append(f"connect: {type(exc).__name__}: {exc}")
                        _discard(conn)
                        conn = None
                        await asyncio.sleep(RECONNECT_S)  # a retry's pace, not a wait for a condition
                        continue
                if self.in_doubt:
                    key_in_doubt = self.in_doubt[0]
                    try:
                        written = await conn.fetchval(insert, key_in_doubt)
                    except CLIENT_ERRORS as exc:
                        self.errors.append(f"resolving {key_in_doubt}: {type(exc).__name__}: {exc}")
                        _discard(conn)
                        conn = None
                        continue
                    self.in_doubt.pop(0)
                    (self.had_not_committed if written is not None else self.had_committed).append(key_in_doubt)
                    self.acked[key_in_doubt] = Ack(time.monotonic(), port)
                    continue
                if self.stopping.is_set():
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # the writer's steady rate
                next_at = max(next_at + interval, time.monotonic())
                key += 1
                try:
                    await conn.fetchval(insert, key)
                except CLIENT_ERRORS as exc:
                    self.errors.append(f"commit {key}: {type(exc).__name__}: {exc}")
                    self.in_doubt.append(key)
                    _discard(conn)
                    conn = None
                    continue
                self.acked[key] = Ack(time.monotonic(), port)
        finally:
            _discard(conn)

    def acked_on_since(self, port: int, since: float) -> int:
        return sum(1 for ack in self.acked.values() if ack.port == port and ack.at > since)

    def longest_gap_since(self, since: float) -> float:
        """The longest time without an acknowledged commit, over the stretches that end after `since`."""
        times = sorted(ack.at for ack in self.acked.values())
        gaps = [b - a for a, b in itertools.pairwise(times) if b > since]
        return max(gaps, default=0.0)

    def tally(self) -> str:
        in_doubt = len(self.had_committed) + len(self.had_not_committed)
        return (
            f"{len(self.acked)} acknowledged, none lost; {in_doubt} in doubt ({len(self.had_committed)} had"
            f" committed, {len(self.had_not_committed)} had not); {len(self.errors)} client errors"
        )

    def first_ack_on_since(self, port: int, since: float) -> float:
        return min(ack.at for ack in self.acked.values() if ack.port == port and ack.at > since) - since


def _discard(conn: asyncpg.Connection | None) -> None:
    """Drops a connection after an error (no goodbye to a server that may be gone)."""
    if conn is not None:
        conn.terminate()


async def _fresh_table(dsn: str, table: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(
            f"CREATE TABLE {table} (key bigint PRIMARY KEY, node int NOT NULL DEFAULT inet_server_port(),"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    finally:
        await conn.close()


async def _rows(dsn: str, table: str) -> dict[int, int]:
    """key -> the port of the node that committed it."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {row["key"]: row["node"] for row in await conn.fetch(f"SELECT key, node FROM {table}")}
    finally:
        await conn.close()


async def _write_through(
    ha: PostgresHA, table: str, event: Callable[[], object], expected_primary: str
) -> tuple[Writer, float]:
    """Runs the writer, lets it commit, runs `event` (in a thread: the writer keeps its pace meanwhile), then lets
    it commit on `expected_primary` before stopping it. Returns the writer and when the event began."""
    writer = Writer(ha.dsn(), table)
    task = asyncio.create_task(writer.run())
    new_port = ha.ports[expected_primary]
    try:
        await eventually(lambda: len(writer.acked) >= RATE, timeout=60, interval=0.05, what="the writer's commits")
        began = time.monotonic()
        await asyncio.to_thread(event)
        await eventually(
            lambda: writer.acked_on_since(new_port, began) >= RATE,
            timeout=DEADLINE_S,
            interval=0.05,
            what=f"commits acknowledged by {expected_primary}",
        )
    finally:
        writer.stopping.set()
        await asyncio.wait_for(task, DEADLINE_S)
    return writer, began


async def _check_nothing_lost(ha: PostgresHA, writer: Writer, table: str) -> dict[int, int]:
    """Every acknowledged key is there, and only those: nothing lost, nothing in doubt left, nothing twice (the
    key is the primary key)."""
    assert not writer.in_doubt
    rows = await _rows(ha.dsn(), table)
    lost = sorted(set(writer.acked) - set(rows))
    assert not lost, f"{len(lost)} acknowledged commits missing: {lost[:20]}"
    assert set(rows) == set(writer.acked)
    assert set(writer.had_committed) | set(writer.had_not_committed) <= set(rows)
    return rows


async def _rejoin(ha: PostgresHA, killed: str, writer: Writer, table: str) -> float:
    """The killed node, run again, rejoins as the standby and replays every acknowledged commit; returns how long
    it took until the cluster was healthy again."""
    restarted_at = time.monotonic()
    await asyncio.to_thread(ha.restart_node, killed)
    await asyncio.to_thread(ha.wait_healthy)
    rejoined = time.monotonic() - restarted_at
    primary = ha.other(killed)
    reported = {n.name: n.reported for n in await asyncio.to_thread(ha.state)}
    assert reported == {primary: "primary", killed: "secondary"}

    async def standby_has_everything() -> bool:
        return set(writer.acked) <= set(await _rows(ha.node_dsn(killed), table))

    await eventually(standby_has_everything, timeout=60, interval=0.2, what=f"{killed} replays every commit")
    return rejoined


async def test_the_primary_s_node_killed_loses_no_acknowledged_commit_and_rejoins(
    postgres_ha: PostgresHA, record_property: Callable[[str, object], None]
) -> None:
    ha = postgres_ha
    await asyncio.to_thread(ha.wait_healthy)
    old = ha.primary()
    assert old is not None
    new = ha.other(old)
    table = "failover_writes"
    await _fresh_table(ha.dsn(), table)

    writer, killed_at = await _write_through(ha, table, lambda: ha.kill_node(old), new)

    gap = writer.longest_gap_since(killed_at)
    resumed = writer.first_ack_on_since(ha.ports[new], killed_at)
    rows = await _check_nothing_lost(ha, writer, table)
    # Which node committed each row, as the nodes themselves recorded it: the old primary before the kill, the new
    # one once writes resumed (but for a key in doubt that had committed on the old primary after all).
    before = {key for key, ack in writer.acked.items() if ack.at < killed_at}
    since = {key for key, ack in writer.acked.items() if ack.at >= killed_at + resumed} - set(writer.had_committed)
    assert {rows[key] for key in before} == {ha.ports[old]}
    assert {rows[key] for key in since} == {ha.ports[new]}

    rejoined = await _rejoin(ha, old, writer, table)

    record_property("bring_up_s", round(ha.bring_up_s or 0, 1))
    record_property("failover_gap_s", round(gap, 2))
    record_property("rejoin_s", round(rejoined, 1))
    print(
        f"\npg_auto_failover: bring-up {ha.bring_up_s or 0:.1f} s; {old} killed -> longest gap between"
        f" acknowledged commits {gap:.2f} s, first commit on {new} {resumed:.2f} s after the kill;"
        f" {writer.tally()}; {old} back as secondary {rejoined:.1f} s after its restart"
    )


async def test_the_standby_s_node_killed_stalls_commits_until_the_monitor_lets_the_primary_go_on_alone(
    postgres_ha: PostgresHA, record_property: Callable[[str, object], None]
) -> None:
    """With two data nodes, a commit waits for the standby; when the standby dies, commits wait until the monitor
    moves the primary to wait_primary, which drops the synchronous standby: from then on an acknowledged commit
    exists on one node only, until the standby is back."""
    ha = postgres_ha
    await asyncio.to_thread(ha.wait_healthy)
    primary = ha.primary()
    assert primary is not None
    standby = ha.other(primary)
    table = "standby_loss_writes"
    await _fresh_table(ha.dsn(), table)

    writer, killed_at = await _write_through(ha, table, lambda: ha.kill_node(standby), primary)

    stall = writer.longest_gap_since(killed_at)
    await _check_nothing_lost(ha, writer, table)
    assert {n.name: n.reported for n in await asyncio.to_thread(ha.state)}[primary] == "wait_primary"
    conn = await asyncpg.connect(ha.node_dsn(primary), timeout=10)
    try:
        assert await conn.fetchval("SHOW synchronous_standby_names") == ""
    finally:
        await conn.close()

    rejoined = await _rejoin(ha, standby, writer, table)

    record_property("standby_loss_stall_s", round(stall, 2))
    print(
        f"\npg_auto_failover: standby {standby} killed -> longest gap between acknowledged commits on {primary}"
        f" {stall:.2f} s; {writer.tally()}; {standby} back as secondary {rejoined:.1f} s after its restart"
    )


async def test_a_planned_switchover_loses_no_acknowledged_commit(
    postgres_ha: PostgresHA, record_property: Callable[[str, object], None]
) -> None:
    ha = postgres_ha
    await asyncio.to_thread(ha.wait_healthy)
    old = ha.primary()
    assert old is not None
    new = ha.other(old)
    table = "switchover_writes"
    await _fresh_table(ha.dsn(), table)

    switched: list[str] = []
    writer, began = await _write_through(ha, table, lambda: switched.append(ha.switchover()), new)

    assert switched == [new]
    gap = writer.longest_gap_since(began)
    await _check_nothing_lost(ha, writer, table)
    assert {n.name: n.reported for n in await asyncio.to_thread(ha.state)} == {new: "primary", old: "secondary"}

    record_property("switchover_gap_s", round(gap, 2))
    print(
        f"\npg_auto_failover switchover {old} -> {new}: longest gap between acknowledged commits {gap:.2f} s;"
        f" {writer.tally()}"
    )
