"""Fixtures of the integration tests (each module gets its own app or binding service, database and vhost)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from services.binding.main import run as run_binding
from services.binding.settings import BindingSettings
from shared.db import create_pool
from shared.messaging import Broker
from shared.settings import CommonSettings
from tests.integration.allocator_support import BindingStandIn, http_client, running_app
from tests.listener import EventLog, listening


@pytest.fixture(scope="module")
async def binding(
    database_url: str, amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[BindingSettings]:
    """The binding service, in this process, on the module's database and vhost; a module may set
    `BINDING_SETTINGS` (a dict of BindingSettings fields) for its own."""
    overrides: dict[str, Any] = getattr(request.module, "BINDING_SETTINGS", {})
    settings = BindingSettings(database_url=database_url, amqp_url=amqp_url, metrics_port=0, **overrides)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_binding(settings, stop, ready))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield settings
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module")
async def watcher(amqp_url: str) -> AsyncIterator[Broker]:
    """Publishes claims as the arp_watcher would, on the module's vhost."""
    broker = Broker(CommonSettings(amqp_url=amqp_url), "arp_watcher")
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture(scope="module")
async def publisher(binding: BindingSettings) -> AsyncIterator[Broker]:
    """A broker connection to publish to the module's binding service as the watchers and the allocator do."""
    broker = Broker(binding, "test")
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture(scope="module")
async def app(database_url: str, amqp_url: str) -> AsyncIterator[FastAPI]:
    async with running_app(database_url, amqp_url, quota=100) as application:
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(app) as c:
        yield c


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the module's database, as a service builds one: room for a service's connection (the
    outbox relay's) and a test's own beside it."""
    pool = await create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def events(amqp_url: str) -> AsyncIterator[EventLog]:
    """A queue of this test's own on the test vhost's exchange, bound to every routing key."""
    async with listening(CommonSettings(amqp_url=amqp_url), ["#"]) as log:
        yield log


@pytest.fixture(scope="module")
async def binding_events(amqp_url: str) -> AsyncIterator[BindingStandIn]:
    """Publishes what the binding service would, on the module's vhost (the allocator's view consumes it)."""
    broker = Broker(CommonSettings(amqp_url=amqp_url), "binding")
    await broker.connect()
    try:
        yield BindingStandIn(broker)
    finally:
        await broker.close()
