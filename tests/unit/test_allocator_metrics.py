"""The subnet gauges: replaced as a whole at each scrape, left out when the database cannot be read."""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from types import SimpleNamespace
from typing import Any

from asyncpg.pool import PoolConnectionProxy
from prometheus_client import generate_latest

from services.allocator import health
from services.allocator.metrics import forget_subnet_usage, record_subnet_usage


def exposition() -> str:
    return generate_latest().decode()


def test_usage_is_replaced_as_a_whole() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    record_subnet_usage([(a, 253, 250), (b, 5, 0)])
    text = exposition()
    assert f'havip_subnet_free_addresses{{subnet_id="{a}"}} 250.0' in text
    assert f'havip_subnet_usable_addresses{{subnet_id="{b}"}} 5.0' in text
    record_subnet_usage([(a, 253, 249)])  # b was deleted
    text = exposition()
    assert f'havip_subnet_free_addresses{{subnet_id="{a}"}} 249.0' in text
    assert str(b) not in text
    forget_subnet_usage()
    assert str(a) not in exposition()


class BrokenDatabase:
    def connection(self) -> AbstractAsyncContextManager[PoolConnectionProxy]:
        raise ConnectionRefusedError("database down")


async def test_an_unreadable_database_leaves_the_gauges_out() -> None:
    stale = uuid.uuid4()
    record_subnet_usage([(stale, 5, 5)])
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(db=BrokenDatabase())))
    response = await health.metrics(request)
    assert isinstance(response.body, bytes)
    text = response.body.decode()
    assert "havip_api_requests_total" in text or "havip_allocations_total" in text  # the rest is served
    assert str(stale) not in text
