"""asyncpg connection pool, database creation, which database errors are the environment's rather than the
message's, and the types of a connection that queries take and of a pool that lends them."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, overload
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from shared.backoff import wait_until_available
from shared.messaging import is_transient
from shared.tls import client_context, describe_tls_failure, naming_the_certificate

log = logging.getLogger(__name__)

# A connection of its own (asyncpg.connect) or one a pool lends (pool.acquire()): the same queries run on either.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


class Queries(Protocol):
    """The statements and transactions of a connection: what a unit of work, the outbox and a repository use.
    An asyncpg connection is one; so is a test's connection that sees each statement before it runs."""

    async def execute(self, query: str, *args: object) -> str: ...

    async def executemany(self, command: str, args: Iterable[Sequence[object]]) -> None: ...

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]: ...

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None: ...

    # A value of any column type: the caller says which it expects where it uses it. `timeout` is asyncpg's
    # own argument, for the callers that bound a statement (the outbox counting its backlog).
    async def fetchval(
        self,
        query: str,
        *args: object,
        column: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any: ...

    def transaction(self) -> Transaction: ...


class Row(Protocol):
    """A row read by column name: an asyncpg record, or a mapping a test builds."""

    def __getitem__(self, column: str, /) -> Any: ...


class ConnectionPool(Protocol):
    """What lends connections: an asyncpg pool, or a test's pool that sees each statement."""

    def acquire(self) -> AbstractAsyncContextManager[Queries]: ...


async def fetch_one(conn: Queries, query: str, *args: object) -> asyncpg.Record:
    """The first row of a statement that always returns one (INSERT … RETURNING without a conflict clause, an
    aggregate, a row this transaction holds locked): its absence is a bug, said here rather than as a None."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise LookupError(f"no row from a statement that always returns one: {query.strip()[:200]}")
    return row


@overload
async def create_pool(
    dsn: str,
    *,
    role: str | None = None,
    min_size: int = 2,
    max_size: int = 10,
    settings: Mapping[str, str] | None = None,
    stop: None = None,
) -> asyncpg.Pool: ...


@overload
async def create_pool(
    dsn: str,
    *,
    role: str | None = None,
    min_size: int = 2,
    max_size: int = 10,
    settings: Mapping[str, str] | None = None,
    stop: asyncio.Event,
) -> asyncpg.Pool | None: ...


async def create_pool(
    dsn: str,
    *,
    role: str | None = None,
    min_size: int = 2,
    max_size: int = 10,
    settings: Mapping[str, str] | None = None,
    stop: asyncio.Event | None = None,
) -> asyncpg.Pool | None:
    """A pool, once Postgres answers: waited for as long as it takes (start-up order is not guaranteed, and an
    operator may still be creating the database or the role), what is wrong said once (shared.backoff). None
    only if `stop` was set first.

    With `role`, every connection acts as that role from its start (the `role` setting, as `SET ROLE`): a
    service then has the rights of its own schema's role only, whichever user the URL names — the same user
    for every service in a development set-up, or the role itself where it may log in. `settings`: more
    server settings for every connection of the pool.
    """
    server_settings = {**(settings or {}), **({"role": role} if role else {})} or None

    async def open_pool() -> asyncpg.Pool:
        try:
            return await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, server_settings=server_settings
            )
        except Exception as exc:
            named = await naming_the_server_certificate(exc, dsn)
            if named is exc:
                raise
            raise named from exc

    return await wait_until_available(
        open_pool,
        what="PostgreSQL",
        unavailable=is_database_unavailable,
        describe=lambda exc: describe_database_error(exc, dsn, role),
        stop=stop,
        logger=log,
    )


def is_database_unavailable(exc: BaseException) -> bool:
    """A database that cannot be used now — away, starting, full, between primaries, or refusing this login,
    database or role (which an operator may fix on the database's side while the service waits)."""
    return isinstance(
        exc, OSError | TimeoutError | asyncpg.PostgresError | asyncpg.TargetServerAttributeNotMatched
    )


async def naming_the_server_certificate(exc: Exception, dsn: str) -> Exception:
    """For a server certificate for other host names than the DSN's (sslmode=verify-full): CertificateNotForHost,
    naming those it is for (read from the first of the DSN's hosts that answers); else `exc`."""
    named = database_address(dsn)
    if named.tls_ca is None:
        return exc
    try:
        context = _verifying(named.tls_ca)
    except OSError:  # a missing file: asyncpg says so already
        return exc
    for host in named.hosts:
        name, _, port = host.rpartition(":")
        result = await naming_the_certificate(exc, name.strip("[]"), int(port), context, postgres=True)
        if result is not exc and isinstance(result, Exception):
            return result
    return exc


def _verifying(ca_file: str) -> ssl.SSLContext:
    return client_context(os.path.expanduser(ca_file))


@dataclass(frozen=True)
class DatabaseAddress:
    """What a DSN names, for messages: its hosts (host:port, several for a primary with standbys), user and
    database — never its password; and the CA file its servers' certificates are verified against, if any."""

    hosts: tuple[str, ...]
    user: str
    database: str
    tls_ca: str | None = None  # sslrootcert (or PGSSLROOTCERT) with sslmode verify-ca or verify-full

    @property
    def where(self) -> str:
        return " or ".join(self.hosts)


def database_address(dsn: str) -> DatabaseAddress:
    """Read a libpq-style URL, multi-host ones included (postgresql://u@h1:5432,h2:5432/db?…), which URL
    parsers refuse."""
    parts = urlsplit(dsn)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) or "postgres"
    query = parse_qs(parts.query)
    if not hostlist:
        hostlist = ",".join(query.get("host", ["localhost"]))
    hosts = tuple(
        host if _has_port(host) else f"{host}:{query.get('port', ['5432'])[0]}" for host in hostlist.split(",")
    )
    sslmode = query.get("sslmode", [os.environ.get("PGSSLMODE", "")])[0]
    ca = None
    if sslmode.startswith("verify"):  # libpq's and asyncpg's default: the user's ~/.postgresql/root.crt
        ca = query.get("sslrootcert", [os.environ.get("PGSSLROOTCERT") or "~/.postgresql/root.crt"])[0]
    return DatabaseAddress(hosts, user, unquote(parts.path[1:]) or user, ca)


def _has_port(host: str) -> bool:
    return host.rpartition(":")[2].isdigit() and not host.endswith("]")


def describe_database_error(exc: BaseException, dsn: str, role: str | None = None) -> str:
    """What is wrong, in an operator's words rather than the driver's."""
    named = database_address(dsn)
    address, user, database = named.where, named.user, named.database
    where = f"PostgreSQL at {address}"
    tls = describe_tls_failure(exc, "PostgreSQL", address, named.tls_ca)
    if tls is not None:
        return tls
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return f"{where} does not accept TLS, which the URL's sslmode requires (its ssl setting is off)"
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return f"none of {address} is a primary (read-write): a failover under way, or every node a standby"
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return f"{where} is read-only (a standby): a failover under way"
    if isinstance(exc, ConnectionRefusedError) or (isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED):
        return f"nothing accepts connections at {address} (is PostgreSQL running?)"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{where} has no database {database!r} (`migrate` creates it)"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"{where} refused the login of user {user!r}: wrong user name or password"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{where} refused the login of user {user!r}: {exc}"
    if isinstance(exc, asyncpg.InvalidParameterValueError) and role is not None and "role" in str(exc):
        return f"{where} has no role {role!r} for the service to act as (`migrate` creates it)"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"{where} is starting up or shutting down"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return f"{where} has no connection slot free"
    if isinstance(exc, TimeoutError):
        return f"{where} did not answer in time"
    detail = exc.args[-1] if isinstance(exc, OSError) and exc.args else exc
    return f"{where} cannot be used: {detail}"


def database_or_network_away(exc: BaseException) -> bool:
    """Failures a consumer retries for as long as they last (R1/R2 in docs/contract.md#reliability); anything
    else is the message's fault after a few tries."""
    return is_transient(exc) or isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.AdminShutdownError
        # A failover: no node is the primary yet, or a connection opened before it now reaches a standby.
        | asyncpg.TargetServerAttributeNotMatched
        | asyncpg.ReadOnlySQLTransactionError,
    )


def maintenance_dsn(dsn: str) -> tuple[str, str]:
    """('postgresql://host/postgres?…', 'dbname') for a DSN whose path names the database: the maintenance
    database on the same hosts, with the same parameters (target_session_attrs: the primary's)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path[1:])
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"the database name {name!r} must be letters, digits and underscores")
    return urlunsplit(parts._replace(path="/postgres")), name


async def ensure_database(dsn: str) -> bool:
    """Create the database the DSN names if it does not exist; True if it was created."""
    admin_dsn, name = maintenance_dsn(dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    admin_dsn, name = maintenance_dsn(dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
