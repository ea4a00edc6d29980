"""Every SQL panel of the Grafana dashboard runs against the real database after the migrations, with Grafana's
macros expanded for a time range, and returns the columns the panel shows: only rows in the range, newest first.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests import grafana

NOW = datetime.now(UTC)
HAVIP = uuid.uuid4()
RELEASED_HAVIP = uuid.uuid4()  # its row is gone, its history stays
CVM1, CVM2 = uuid.uuid4(), uuid.uuid4()
MAC1, MAC2, INTRUDER = "02:00:c0:00:02:0b", "02:00:c0:00:02:0c", "02:00:c0:00:02:42"

EXPECTED_COLUMNS = {
    "Recent transitions": [
        "time",
        "address",
        "havip_id",
        "sequence",
        "reason",
        "from_instance_id",
        "to_instance_id",
        "mac",
        "capture_to_commit_ms",
        "watcher_id",
    ],
    "Recent refused claims": ["time", "address", "mac", "reason", "frames", "havip_id", "watcher_id"],
}


@pytest.fixture(scope="module")
async def history(db: asyncpg.Connection) -> None:
    """Transitions and refusals inside the last hour, and one of each from two days ago."""
    await db.execute(
        "INSERT INTO binding.havips (id, vpc_id, subnet_id, address) VALUES ($1, $2, $3, '192.0.2.10/32')",
        HAVIP,
        uuid.uuid4(),
        uuid.uuid4(),
    )
    ago = NOW - timedelta(minutes=5)
    transitions = [
        # havip, sequence, from, to, mac, captured_at, committed_at, reason
        (HAVIP, 1, None, CVM1, MAC1, NOW - timedelta(days=2), NOW - timedelta(days=2), "claim"),
        (HAVIP, 2, CVM1, CVM2, MAC2, ago - timedelta(milliseconds=3), ago, "claim"),
        (RELEASED_HAVIP, 1, None, CVM1, MAC1, NOW - timedelta(minutes=4), NOW - timedelta(minutes=4), "claim"),
        (RELEASED_HAVIP, 2, CVM1, None, None, None, NOW - timedelta(minutes=3), "release"),
    ]
    await db.executemany(
        """INSERT INTO binding.transitions (havip_id, sequence, from_instance_id, to_instance_id, mac, captured_at,
               committed_at, watcher_id, reason)
           VALUES ($1, $2, $3, $4, $5::macaddr, $6, $7, 'host/cap', $8)""",
        transitions,
    )
    await db.executemany(
        """INSERT INTO binding.rejected_claims (havip_id, address, mac, reason, captured_at, watcher_id,
               recorded_at, count)
           VALUES ($1, '192.0.2.10/32', $2::macaddr, $3, $4, 'host/cap', $4, $5)""",
        [
            (HAVIP, INTRUDER, "unknown_mac", NOW - timedelta(minutes=2), 7),
            (HAVIP, INTRUDER, "eth_mismatch", NOW - timedelta(days=2), 1),
        ],
    )


def panel_sql(title: str) -> str:
    [query] = [q for q in grafana.sql_queries(grafana.dashboard()) if q.panel == title]
    return grafana.sql(query.text, NOW - timedelta(hours=1), NOW + timedelta(seconds=1))


def test_every_sql_panel_is_covered_here() -> None:
    assert {q.panel for q in grafana.sql_queries(grafana.dashboard())} == set(EXPECTED_COLUMNS)


@pytest.mark.parametrize("title", sorted(EXPECTED_COLUMNS))
async def test_sql_panel_returns_its_columns(db: asyncpg.Connection, history: None, title: str) -> None:
    statement = await db.prepare(panel_sql(title))
    assert [attribute.name for attribute in statement.get_attributes()] == EXPECTED_COLUMNS[title]
    assert statement.get_attributes()[0].type.name == "timestamptz"  # Grafana's time column


async def test_recent_transitions_lists_the_time_range_newest_first(db: asyncpg.Connection, history: None) -> None:
    rows = await db.fetch(panel_sql("Recent transitions"))
    assert [(r["havip_id"], r["sequence"], r["reason"]) for r in rows] == [
        (RELEASED_HAVIP, 2, "release"),
        (RELEASED_HAVIP, 1, "claim"),
        (HAVIP, 2, "claim"),
    ]
    released, _, failover = rows
    assert released["address"] is None  # the HAVIP was released: its history stays, its address row is gone
    assert released["capture_to_commit_ms"] is None
    assert failover["address"] == "192.0.2.10"
    assert (failover["from_instance_id"], failover["to_instance_id"], failover["mac"]) == (CVM1, CVM2, MAC2)
    assert float(failover["capture_to_commit_ms"]) == pytest.approx(3.0)
    assert failover["watcher_id"] == "host/cap"


async def test_recent_refused_claims_lists_the_time_range(db: asyncpg.Connection, history: None) -> None:
    rows = await db.fetch(panel_sql("Recent refused claims"))
    assert [(r["address"], r["mac"], r["reason"], r["frames"], r["havip_id"]) for r in rows] == [
        ("192.0.2.10", INTRUDER, "unknown_mac", 7, HAVIP)
    ]


async def test_recent_transitions_reads_the_commit_time_index(db: asyncpg.Connection, history: None) -> None:
    """History is kept forever and the panel refreshes every few seconds: it must not scan it all."""
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")  # the planner's choice on a table this small is moot
        plan = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + panel_sql("Recent transitions")))
    assert "transitions_committed_at" in plan, plan
