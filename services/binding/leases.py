"""Which partitions this binding replica decides: Postgres advisory locks, held on a session of their own.

A partition is this replica's while its session holds the partition's advisory lock; every replica also holds a
shared membership lock, so that Postgres counts the replicas alive (pg_locks) and each aims at its share
(services/binding/spread.py). The session runs with `idle_session_timeout`, and the lease loop speaks on it several
times within that time: a replica that dies closes the session at once, one that is frozen (SIGSTOP, a VM paused)
goes silent and Postgres ends its session after the timeout — either way its locks are free for the others, with
no election of our own. The membership lock's key carries the replica's P: replicas configured with different
partition counts see it (`disagreeing`), and the alert on havip_binding_partition_counts fires.

A replica that gives a partition up stops its consumer first (the batch under way is committed and acknowledged)
and unlocks after; it then notifies the others (LISTEN/NOTIFY), which try at once instead of at their next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from services.binding.spread import next_step
from shared.backoff import wait_until_available
from shared.db import database_or_network_away, describe_database_error

log = logging.getLogger(__name__)

CHANNEL = "havip_binding_partitions"


def lock_class(what: str, scope: str) -> int:
    """The first int4 of an advisory lock key, within the database: one per deployment (`scope`: its
    HAVIP_AMQP_PREFIX, which already keeps deployments sharing a broker apart)."""
    digest = hashlib.blake2b(f"havip.binding.{what}:{scope}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


_MEMBERS = """
    SELECT count(*) AS replicas, count(DISTINCT objid) AS partition_counts FROM pg_locks
    WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2 AND granted
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
_TRY = """
    SELECT p FROM unnest($2::int[]) WITH ORDINALITY AS t(p, n)
    WHERE pg_try_advisory_lock($1, p) ORDER BY n LIMIT $3"""


# The longest wait between two attempts to open the lease session again.
LEASE_RECONNECT_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    database_url: str
    partitions: int
    start: int  # where this replica's first tries begin (spread.next_step)
    scope: str = ""  # the deployment (lock_class)
    interval_s: float = 0.2
    timeout_s: float = 10.0  # idle_session_timeout: a frozen replica's locks are free after this


PartitionChange = Callable[[int], Awaitable[None]]
T = TypeVar("T")


class PartitionLeases:
    """Holds this replica's share of the partitions until stopped. `acquired(p)` is awaited once a partition's
    lock is taken (start deciding it), `releasing(p)` before its lock is given up or once it was lost with the
    session (stop deciding it)."""

    def __init__(
        self,
        settings: LeaseSettings,
        acquired: PartitionChange,
        releasing: PartitionChange,
        *,
        able: Callable[[], bool] = lambda: True,
        listen: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self._settings = settings
        # Whether this replica can decide now (its broker connection is up): a replica that cannot consume hands
        # its partitions over rather than hold them while the claims wait.
        self._able = able
        self._wake = asyncio.Event()
        self._listen = {CHANNEL: self._wake.set, **(listen or {})}  # NOTIFY channels heard on the lease session
        self._acquired = acquired
        self._releasing = releasing
        self.held: set[int] = set()
        self.replicas = 0
        self.partition_counts = 0  # distinct P among the replicas: more than 1 is a misconfiguration
        self._conn: asyncpg.Connection | None = None
        self._session_lock = asyncio.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._session_lost: BaseException | None = None
        self._partition_locks = lock_class("partitions", settings.scope)  # (this, partition)
        self._membership = lock_class("replicas", settings.scope)  # (this, P), shared by every replica

    async def run(self, stop: asyncio.Event) -> None:
        """Take and keep a share until `stop`; then hand every partition over (drain)."""
        try:
            while not stop.is_set():
                if self._conn is None:
                    if not await self._connect(stop):
                        return
                    self._keepalive = asyncio.create_task(self._keep_alive(), name="partition lease keep-alive")
                try:
                    if self._session_lost is not None:
                        raise self._session_lost
                    await self._balance()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    await self._lost(exc)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(self._wake, stop), self._settings.interval_s)
        finally:
            await self._drain()

    async def _keep_alive(self) -> None:
        """Speak on the session every interval, whatever the balancing does meanwhile (starting a consumer, waiting
        for a batch to commit): only a replica that is really silent — frozen, or its event loop stuck for the
        whole timeout — loses its session."""
        conn = self._conn
        while conn is not None and not conn.is_closed():
            try:
                await self._on_session(lambda c: c.execute("SELECT 1"))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                self._session_lost = exc
                self._wake.set()
                return
            await asyncio.sleep(self._settings.interval_s)

    async def _on_session(self, query: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One statement on the lease session (asyncpg runs one at a time per connection)."""
        conn = self._conn
        if conn is None:
            raise asyncpg.InterfaceError("the lease session is closed")
        async with self._session_lock:
            return await query(conn)

    async def _connect(self, stop: asyncio.Event) -> bool:
        s = self._settings

        async def open_session() -> asyncpg.Connection:
            conn = await asyncpg.connect(
                s.database_url,
                server_settings={
                    "idle_session_timeout": str(int(s.timeout_s * 1000)),
                    "application_name": "havip-binding-leases",
                },
            )
            try:
                await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", self._membership, s.partitions)
                for channel, heard in self._listen.items():
                    await conn.add_listener(channel, lambda *_, heard=heard: heard())
            except BaseException:
                await conn.close()
                raise
            return conn

        async def connect() -> asyncpg.Connection:
            # A stop ends the wait, not the attempt under way: asyncpg cancelled mid-handshake leaves a future
            # whose error nobody retrieves. The attempt finishes on its own, and its session is closed.
            attempt = asyncio.ensure_future(open_session())
            try:
                return await asyncio.shield(attempt)
            except asyncio.CancelledError:
                attempt.add_done_callback(_close_if_opened)
                raise

        conn = await wait_until_available(
            connect,
            what="Postgres (partition leases)",
            unavailable=database_or_network_away,
            describe=lambda exc: describe_database_error(exc, s.database_url),
            stop=stop,
            # Without its lease session a replica decides nothing: after a Postgres failover it must be back as
            # soon as the standby is promoted, not up to half a minute later.
            max_delay_s=LEASE_RECONNECT_MAX_S,
            logger=log,
        )
        self._conn = conn
        return conn is not None

    async def _balance(self) -> None:
        s = self._settings
        row = await self._on_session(lambda c: c.fetchrow(_MEMBERS, self._membership))
        assert row is not None
        self.replicas, self.partition_counts = row["replicas"], row["partition_counts"]
        if not self._able():
            if self.held:
                log.warning("cannot consume (RabbitMQ away): handing the partitions over until it is back")
                for partition in sorted(self.held):
                    await self._give_up(partition)
                await self._notify()
            return
        step = next_step(self.held, s.partitions, self.replicas, s.start)
        for partition in step.release:
            await self._give_up(partition)
        if step.release:
            await self._notify()
        if step.wanted > 0 and step.try_lock:
            taken = await self._on_session(
                lambda c: c.fetch(_TRY, self._partition_locks, list(step.try_lock), step.wanted)
            )
            for record in taken:
                partition = record["p"]
                self.held.add(partition)
                log.info("deciding partition %d", partition, extra={"partition": partition})
                try:
                    await self._acquired(partition)
                except Exception:
                    # Never hold a lock for a partition nobody consumes: another replica takes it.
                    log.exception("could not start deciding partition %d: handing it over", partition)
                    await self._give_up(partition)
                    await self._notify()

    async def _notify(self) -> None:
        await self._on_session(lambda c: c.execute("SELECT pg_notify($1, '')", CHANNEL))

    async def _give_up(self, partition: int) -> None:
        await self._releasing(partition)
        self.held.discard(partition)
        await self._on_session(
            lambda c: c.execute("SELECT pg_advisory_unlock($1, $2)", self._partition_locks, partition)
        )
        log.info("handed partition %d over", partition, extra={"partition": partition})

    async def _lost(self, exc: BaseException) -> None:
        """The session is gone (Postgres away, or it ended a session that was silent too long): its locks went
        with it, another replica may be deciding these partitions already."""
        if self.held:
            log.warning(
                "partition leases lost with their Postgres session (%s): deciding none until taken again",
                exc,
                extra={"partitions": sorted(self.held)},
            )
        for partition in sorted(self.held):
            await self._releasing(partition)
        self.held.clear()
        await self._close()

    async def _drain(self) -> None:
        """Planned stop: stop deciding each partition, then free its lock and tell the others at once."""
        usable = self._conn is not None and self._session_lost is None
        try:
            for partition in sorted(self.held):
                if usable:
                    try:
                        await self._give_up(partition)
                        continue
                    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                        log.warning("handing partitions over: %s", exc)
                        usable = False
                await self._releasing(partition)
            self.held.clear()
            if usable:
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await self._notify()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keepalive
            self._keepalive = None
        self._session_lost = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)


def _close_if_opened(attempt: asyncio.Future[asyncpg.Connection]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return
    attempt.result().terminate()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
