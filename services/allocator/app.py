"""Composition root: settings → pool (as the allocator's database role), broker, outbox relay, the consumer of
the binding service's events that keeps the allocator's view of bindings → FastAPI application."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from services.allocator import health
from services.allocator.auth import TokenAuth
from services.allocator.binding_view.service import QUEUE as VIEW_QUEUE
from services.allocator.binding_view.service import SUBSCRIPTIONS as VIEW_SUBSCRIPTIONS
from services.allocator.binding_view.service import BindingView
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
from shared.advisory_lock import one_at_a_time
from shared.db import create_pool, database_or_network_away
from shared.heap import freeze_startup_heap
from shared.messaging import Broker
from shared.migrations import service_role
from shared.outbox import OutboxRelay
from shared.periodic import run_periodically
from shared.tasks import cancel, until_stopped

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DOCS_ASSETS_URL = "/docs/assets"  # Swagger UI's and ReDoc's files, from the fastapi-offline package
DESCRIPTION = """Control plane of high-availability virtual IPs: VPCs, subnets, instances and HAVIPs.

Every `/v1` route requires `Authorization: Bearer <token>`.

**The binding fields are eventually consistent.** A HAVIP's `state`, `bound_instance_id`, `bound_mac`,
`last_transition_at`, `last_seen_at`, `flapping` and `split_brain`, its transitions and the audit of refused
claims come from the binding service's events (`havip.binding.changed`, …) into the allocator's own tables: they
show a change milliseconds after the binding service committed it (measured under load on a 2-core machine:
p50 7–13 ms, p99 13–41 ms, most of it the binding's own publishing; docs/benchmarks.md). The metric
`havip_view_delay_seconds` on `/metrics` exports it as the allocator sees it. `last_seen_at` is the capture time
of the claim that made the current holder (holders' refreshes are not published as events). A release's 409
`HAVIP_BOUND` is decided on this view. Errors are
`{"error": {"code": "UPPER_SNAKE", "message": "..."}}` with a 4xx status (503 `SERVICE_UNAVAILABLE` while the
database is unreachable). Times are RFC 3339 in UTC with microseconds. Lists are paginated: pass the
`next_page_token` of a page as `page_token` to get the next one.
"""


class ConfigurationError(RuntimeError):
    pass


# Advisory locks of the periodic passes: with several replicas, one runs a pass at a time and the others skip it.
PURGE_LOCK = "havip allocator idempotency key purge"
VIEW_MAINTENANCE_LOCK = "havip allocator view maintenance"


def purge_idempotency_keys(db: Database, ttl_hours: int) -> Callable[[], Awaitable[bool]]:
    """A pass that forgets expired Idempotency-Keys (expired keys are ignored even before they are deleted), run
    by one replica at a time: True if this one ran it."""

    async def purge() -> None:
        deleted = await havips_service.purge_idempotency_keys(db, ttl_hours)
        if deleted:
            log.info("expired idempotency keys deleted", extra={"deleted": deleted})

    return one_at_a_time(db.pool, PURGE_LOCK, purge)


def maintain_view(view: BindingView, db: Database, settings: AllocatorSettings) -> Callable[[], Awaitable[bool]]:
    """What is run every few seconds: ask for the transitions missing from histories (sequence gaps); about once
    an hour: age refused claims out of the audit — by one replica at a time (True if this one did). Every replica
    updates its own open-gap gauge at each pass, so that none exports a count that has gone stale."""
    last_expiry = -math.inf

    async def repair_and_expire() -> None:
        nonlocal last_expiry
        await view.request_repairs(
            grace_s=settings.view_gap_grace_s,
            retry_s=settings.view_repair_retry_s,
            max_attempts=settings.view_repair_attempts,
        )
        if time.monotonic() - last_expiry > AUDIT_EXPIRY_INTERVAL_S:
            last_expiry = time.monotonic()
            deleted = await view.expire_refusals(settings.audit_retention_days)
            if deleted:
                log.info("refused claims past retention deleted", extra={"deleted": deleted})

    exclusive = one_at_a_time(db.pool, VIEW_MAINTENANCE_LOCK, repair_and_expire)

    async def maintain() -> bool:
        ran = await exclusive()
        await view.count_open_gaps()
        return ran

    return maintain


AUDIT_EXPIRY_INTERVAL_S = 3600.0


def create_app(settings: AllocatorSettings, stop: asyncio.Event | None = None) -> FastAPI:
    """The application; `stop`, once set, ends its start-up's waits for Postgres and RabbitMQ."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    if token is None and not settings.insecure_no_auth:
        raise ConfigurationError("no API token configured (HAVIP_API_TOKEN)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if token is None:
            log.warning("HAVIP_INSECURE_NO_AUTH is set: the API accepts unauthenticated calls")
        elif settings.weak_token:
            log.warning("HAVIP_API_TOKEN is shorter than 16 characters; use a long random token")
        stopped = stop if stop is not None else asyncio.Event()
        async with AsyncExitStack() as stack:
            role = settings.database_role or service_role(SCHEMA)
            pool = await create_pool(settings.database_url, role=role, stop=stopped)
            if pool is None:
                yield
                return
            stack.push_async_callback(pool.close)
            broker = Broker(settings, SOURCE)
            stack.push_async_callback(broker.close)
            if not await broker.connect(stopped):
                yield
                return
            relay = OutboxRelay(pool, broker, SCHEMA)
            relay.start()
            stack.push_async_callback(relay.stop)
            db = Database(pool, relay)
            purge = asyncio.create_task(
                run_periodically(
                    purge_idempotency_keys(db, settings.idempotency_ttl_hours),
                    settings.idempotency_purge_interval_s,
                    what="purging expired idempotency keys",
                    at_start=True,
                    logger=log,
                ),
                name="idempotency key purge",
            )
            stack.push_async_callback(cancel, purge)
            view = BindingView(db)
            # Waited for while RabbitMQ is away or refuses its user a right on the queue (said once, in words).
            consumer = await until_stopped(
                broker.consumer(
                    VIEW_QUEUE,
                    VIEW_SUBSCRIPTIONS,
                    view.handle,
                    prefetch=settings.view_prefetch,
                    max_batch=settings.view_max_batch,
                    transient=database_or_network_away,
                ),
                stopped,
            )
            if consumer is None:
                log.info("stopped before consuming")
                yield
                return
            stack.push_async_callback(consumer.stop)
            await view.seed()
            maintenance = asyncio.create_task(
                run_periodically(
                    maintain_view(view, db, settings),
                    settings.view_maintenance_interval_s,
                    what="maintaining the view of bindings",
                    at_start=True,
                    logger=log,
                ),
                name="binding view maintenance",
            )
            stack.push_async_callback(cancel, maintenance)
            app.state.db = db
            app.state.broker = broker
            freeze_startup_heap()
            log.info("allocator ready")
            yield
            log.info("stopping: the view's batch under way is committed, then the outbox is published")
            del app.state.db
            del app.state.broker

    # /docs (Swagger UI) and /redoc load their JavaScript, CSS and icon from the allocator itself, open like
    # /openapi.json: FastAPI's defaults load them from a CDN, and the pages stay blank where there is none.
    app = FastAPIOffline(
        title="HAVIP allocator",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS_URL,
        # Swagger UI would otherwise show a badge from validator.swagger.io, handing it the document's URL.
        swagger_ui_parameters={"validatorUrl": None},
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
