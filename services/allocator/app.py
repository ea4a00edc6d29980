"""Composition root: settings → pool, broker, outbox relay → FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from services.allocator import health
from services.allocator.auth import TokenAuth
from services.allocator.body_limit import BodyLimitMiddleware
from services.allocator.claims.router import router as claims_router
from services.allocator.database import SCHEMA, SOURCE, Database
from services.allocator.exception_handlers import install_exception_handlers
from services.allocator.havips import service as havips_service
from services.allocator.havips.router import router as havips_router
from services.allocator.instances.router import router as instances_router
from services.allocator.metrics import MetricsMiddleware
from services.allocator.settings import AllocatorSettings
from services.allocator.subnets.router import router as subnets_router
from services.allocator.vpcs.router import router as vpcs_router
from shared.db import create_pool
from shared.messaging import Broker
from shared.outbox import OutboxRelay

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """Control plane of high-availability virtual IPs: VPCs, subnets, instances and HAVIPs.

Every `/v1` route requires `Authorization: Bearer <token>`. Errors are
`{"error": {"code": "UPPER_SNAKE", "message": "..."}}` with a 4xx status (503 `SERVICE_UNAVAILABLE` while the
database is unreachable). Times are RFC 3339 in UTC with microseconds. Lists are paginated: pass the
`next_page_token` of a page as `page_token` to get the next one.
"""


class ConfigurationError(RuntimeError):
    pass


async def purge_idempotency_keys(db: Database, ttl_hours: int, interval_s: float) -> None:
    """Forget expired Idempotency-Keys now and then (expired keys are ignored even before they are deleted)."""
    while True:
        try:
            deleted = await havips_service.purge_idempotency_keys(db, ttl_hours)
            if deleted:
                log.info("expired idempotency keys deleted", extra={"deleted": deleted})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("purging expired idempotency keys failed: %r", exc)
        await asyncio.sleep(interval_s)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: AllocatorSettings) -> FastAPI:
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    if token is None and not settings.insecure_no_auth:
        raise ConfigurationError("no API token configured (HAVIP_API_TOKEN)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if token is None:
            log.warning("HAVIP_INSECURE_NO_AUTH is set: the API accepts unauthenticated calls")
        elif settings.weak_token:
            log.warning("HAVIP_API_TOKEN is shorter than 16 characters; use a long random token")
        async with AsyncExitStack() as stack:
            pool = await create_pool(settings.database_url)
            stack.push_async_callback(pool.close)
            broker = Broker(settings, SOURCE)
            stack.push_async_callback(broker.close)
            await broker.connect()
            relay = OutboxRelay(pool, broker, SCHEMA)
            relay.start()
            stack.push_async_callback(relay.stop)
            db = Database(pool, relay)
            purge = asyncio.create_task(
                purge_idempotency_keys(db, settings.idempotency_ttl_hours, settings.idempotency_purge_interval_s),
                name="idempotency key purge",
            )
            stack.push_async_callback(_cancel, purge)
            app.state.db = db
            app.state.broker = broker
            log.info("allocator ready")
            yield
            del app.state.db
            del app.state.broker

    app = FastAPI(
        title="HAVIP allocator",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.eip_pool = settings.eips
    app.state.auth = TokenAuth(token)
    install_exception_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)  # added last: outermost, so it sees every answer
    app.include_router(health.router)
    for router in (vpcs_router, subnets_router, instances_router, havips_router, claims_router):
        app.include_router(router)
    return app
