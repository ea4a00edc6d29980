"""HAVIP_DATABASE_URL with one host or a primary and its standbys (libpq's multi-host URL): what messages name,
the maintenance database used to create a service's database, and which errors of a failover are waited out."""

from __future__ import annotations

import asyncpg
import pytest

from shared.db import database_address, database_or_network_away, describe_database_error, maintenance_dsn

MULTI = "postgresql://havip:secret@10.0.0.1:5433,10.0.0.2/havip?target_session_attrs=read-write"


def test_one_host() -> None:
    named = database_address("postgresql://postgres@127.0.0.1:5432/havip")
    assert (named.hosts, named.user, named.database) == (("127.0.0.1:5432",), "postgres", "havip")


def test_several_hosts_each_with_its_port_or_the_default() -> None:
    named = database_address(MULTI)
    assert named.hosts == ("10.0.0.1:5433", "10.0.0.2:5432")
    assert (named.user, named.database) == ("havip", "havip")
    assert named.where == "10.0.0.1:5433 or 10.0.0.2:5432"


def test_hosts_given_as_parameters() -> None:
    named = database_address("postgresql:///havip?host=/var/run/postgresql&port=5433")
    assert named.hosts == ("/var/run/postgresql:5433",)
    assert named.user == "postgres"


def test_the_maintenance_database_is_on_the_same_hosts_with_the_same_parameters() -> None:
    admin, name = maintenance_dsn(MULTI)
    assert name == "havip"
    assert admin == "postgresql://havip:secret@10.0.0.1:5433,10.0.0.2/postgres?target_session_attrs=read-write"


def test_a_database_name_it_cannot_create_is_refused_without_the_password() -> None:
    with pytest.raises(ValueError, match="letters, digits and underscores") as raised:
        maintenance_dsn("postgresql://havip:secret@10.0.0.1/havip-prod")
    assert "secret" not in str(raised.value)


def test_a_failover_under_way_is_said_in_words_and_waited_out() -> None:
    between = asyncpg.TargetServerAttributeNotMatched("None of the hosts match")
    standby = asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")
    assert describe_database_error(between, MULTI) == (
        "none of 10.0.0.1:5433 or 10.0.0.2:5432 is a primary (read-write): a failover under way, or every node "
        "a standby"
    )
    assert "is read-only (a standby)" in describe_database_error(standby, MULTI)
    assert database_or_network_away(between)
    assert database_or_network_away(standby)


def test_refused_connections_name_every_host_and_never_the_password() -> None:
    said = describe_database_error(ConnectionRefusedError(111, "refused"), MULTI)
    assert said == "nothing accepts connections at 10.0.0.1:5433 or 10.0.0.2:5432 (is PostgreSQL running?)"
    assert "secret" not in describe_database_error(asyncpg.InvalidPasswordError("no"), MULTI)
