"""What a service sees of its Postgres's high availability, exported as metrics every few seconds: the hosts its
URL names, whether the one it writes to has a synchronous standby, and whether the failover monitor answers.

Read with the service's own role, which may not read another session's replication state
(`pg_stat_replication` shows its columns to superusers and pg_read_all_stats only): the primary's
`synchronous_standby_names` tells instead. pg_auto_failover empties it when the standby is lost (the primary
goes on alone: `wait_primary`) and sets it again when a standby has caught up; Patroni's synchronous mode does
the same. The monitor is asked, when HAVIP_DATABASE_MONITOR_URL names it, for the nodes it knows and their
states."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import Gauge

from shared.db import ConnectionPool, database_address

log = logging.getLogger(__name__)

HOSTS = Gauge("havip_database_hosts", "Postgres hosts the service's database URL names (a primary and standbys)")
SYNCHRONOUS_STANDBY = Gauge(
    "havip_database_synchronous_standby",
    "1 while the primary the service writes to commits on a synchronous standby too (synchronous_standby_names "
    "set), 0 while it runs alone, -1 until known",
)
MONITOR_UP = Gauge(
    "havip_database_monitor_up", "1 while the failover monitor answers, 0 when it does not (-1: none configured)"
)
MONITOR_NODES = Gauge(
    "havip_database_monitor_nodes", "Data nodes the failover monitor reports, by their current state", ["state"]
)

MONITOR_TIMEOUT_S = 3.0
DATABASE_HEALTH_INTERVAL_S = 5.0
_NODES = "SELECT reportedstate::text AS state, count(*) AS nodes FROM pgautofailover.node GROUP BY 1"


class DatabaseHealth:
    def __init__(self, pool: ConnectionPool, database_url: str, monitor_url: str | None = None) -> None:
        self._pool = pool
        self._monitor_url = monitor_url
        self._states: set[str] = set()
        self._monitor_answered: bool | None = None
        HOSTS.set(len(database_address(database_url).hosts))
        SYNCHRONOUS_STANDBY.set(-1)
        MONITOR_UP.set(-1 if monitor_url is None else 0)

    async def check(self) -> None:
        """One look at both (run_periodically); a database away leaves the last value, the monitor away is 0."""
        await asyncio.gather(self._check_primary(), self._check_monitor())

    async def _check_primary(self) -> None:
        async with self._pool.acquire() as conn:
            names = await conn.fetchval("SELECT current_setting('synchronous_standby_names')")
        SYNCHRONOUS_STANDBY.set(1 if names else 0)

    async def _check_monitor(self) -> None:
        if self._monitor_url is None:
            return
        try:
            conn = await asyncpg.connect(self._monitor_url, timeout=MONITOR_TIMEOUT_S)
            try:
                rows = await conn.fetch(_NODES, timeout=MONITOR_TIMEOUT_S)
            finally:
                await conn.close(timeout=MONITOR_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._monitor_answered is not False:  # said once per outage
                log.warning("the failover monitor does not answer: %s", exc)
            self._monitor_answered = False
            MONITOR_UP.set(0)
            return
        if self._monitor_answered is False:
            log.info("the failover monitor answers again")
        self._monitor_answered = True
        MONITOR_UP.set(1)
        states = {row["state"]: row["nodes"] for row in rows}
        for gone in self._states - states.keys():
            MONITOR_NODES.labels(gone).set(0)
        for state, nodes in states.items():
            MONITOR_NODES.labels(state).set(nodes)
        self._states = set(states)
