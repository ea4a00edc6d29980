"""Fixtures: a database and a RabbitMQ virtual host for each test module, dropped after it.

Tests never touch what they did not create: everything lives in `havip_test_<hex>` (Postgres) and the
vhost `havip-test-<hex>` (RabbitMQ), both removed at the end even when tests fail. One pair per module keeps
modules independent: a service under test in one module never consumes what another module left behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from tests import service_logs
from tests.sandbox import temporary_database, temporary_vhost

# Fixtures of clusters started on this machine (only for the tests that ask for them).
pytest_plugins = ["tests.clusters.postgres", "tests.clusters.rabbitmq"]

PG_BASE = os.environ.get("HAVIP_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_BASE = os.environ.get("HAVIP_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
RUN_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
async def database_url() -> AsyncIterator[str]:
    async with temporary_database(PG_BASE, f"havip_test_{RUN_ID}_{uuid.uuid4().hex[:6]}") as dsn:
        yield dsn


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    with temporary_vhost(AMQP_BASE, f"havip-test-{RUN_ID}-{uuid.uuid4().hex[:6]}") as url:
        yield url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test shows the tails of the logs of the processes it (or its fixtures) started."""
    report = yield
    if report.failed:
        logs = service_logs.tails()
        if logs:
            report.sections.append(("service logs", logs))
    if report.when == "teardown":
        service_logs.end_of_test()
    return report
