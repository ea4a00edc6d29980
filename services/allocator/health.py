"""Open routes: liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from services.allocator.metrics import forget_subnet_usage, record_subnet_usage
from services.allocator.subnets.service import subnet_usage
from shared.metrics import exposition

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _database_ready(request: Request) -> str | None:
    db = getattr(request.app.state, "db", None)
    if db is None:
        return "not started"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), db.connection() as conn:
            # The allocator's own schema only, its view of bindings included (migration 0004).
            missing = await conn.fetchval(
                """SELECT to_regclass('allocator.havips') IS NULL
                          OR to_regclass('allocator.view_bindings') IS NULL"""
            )
    except Exception as exc:
        log.warning("readiness: database check failed: %r", exc)
        return "unreachable"
    return "migrations not applied" if missing else None


def _broker_ready(request: Request) -> str | None:
    broker = getattr(request.app.state, "broker", None)
    if broker is None:
        return "not started"
    try:
        closed = broker.connection.is_closed
    except RuntimeError:
        return "not connected"
    return "disconnected" if closed else None


@router.get(
    "/readyz",
    summary="Database and broker reachable",
    responses={503: {"description": "a dependency is not ready"}},
)
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, Any] = {
        "database": await _database_ready(request) or "ok",
        "broker": _broker_ready(request) or "ok",
    }
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


async def _refresh_subnet_gauges(request: Request) -> None:
    db = getattr(request.app.state, "db", None)
    if db is None:
        return
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            usage = await subnet_usage(db)
    except Exception as exc:
        log.warning("metrics: subnet usage not readable: %r", exc)
        forget_subnet_usage()
        return
    record_subnet_usage(usage)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    await _refresh_subnet_gauges(request)
    body, content_type = exposition()
    return Response(content=body, media_type=content_type)
