"""The one place that turns failures into HTTP answers: `{"error": {"code": "UPPER_SNAKE", "message": "..."}}`.

Domain errors map by kind; FastAPI's validation errors, unknown routes and methods, malformed JSON and
oversized bodies get the same shape; database constraint violations (the safety net behind the advisory
locks) become 409; an unreachable database becomes 503. Nothing a client sends yields a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.allocator.errors import (
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
)

log = logging.getLogger(__name__)

STATUS_BY_KIND: tuple[tuple[type[DomainError], int], ...] = (
    (Invalid, 400),
    (Unauthenticated, 401),
    (QuotaExceeded, 403),
    (NotFound, 404),
    (Conflict, 409),
)

CODE_BY_HTTP_STATUS: Mapping[int, str] = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}

# Constraint names of migrations/0001_initial.sql → (code, message).
CONSTRAINT_CODES: Mapping[str, tuple[str, str]] = {
    "instances_mac_key": ("MAC_IN_USE", "the MAC address is already registered"),
    "instances_private_ip_key": ("ADDRESS_IN_USE", "the address is already in use"),
    "havips_address_key": ("ADDRESS_IN_USE", "the address is already in use"),
    # raised by the free-range triggers (migration 0005) when an address is not free
    "free_ranges_address_free": ("ADDRESS_IN_USE", "the address is already in use"),
    "havips_eip_key": ("EIP_IN_USE", "the EIP is already associated"),
    "subnets_vpc_id_cidr_key": ("SUBNET_OVERLAP", "the VPC already has this subnet"),
}


def error_body(code: str, message: str, details: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = list(details)
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def status_of(exc: DomainError) -> int:
    for kind, status in STATUS_BY_KIND:
        if isinstance(exc, kind):
            return status
    return 500


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return error_response(status_of(exc), exc.error_code, exc.message, headers=headers)


# Where a request's value sits, as a client would name it: a body field by its JSON path (`cidr`,
# `candidates.1`), a parameter by its kind (`query parameter limit`).
_PARAMETER_KINDS = {"query": "query parameter", "path": "path parameter", "header": "header"}


def _location(loc: Sequence[int | str]) -> str:
    parts = [str(part) for part in loc]
    if not parts:
        return "request"
    if parts[0] == "body":
        return ".".join(parts[1:]) or "request body"
    if parts[0] in _PARAMETER_KINDS and len(parts) > 1:
        return f"{_PARAMETER_KINDS[parts[0]]} {'.'.join(parts[1:])}"
    return ".".join(parts)


def _message(error: Mapping[str, Any]) -> str:
    """What is wrong, in the validator's own words: pydantic puts "Value error, " before a ValueError's text."""
    if error.get("type") == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        if cause is not None and str(cause):
            return str(cause)
    return str(error.get("msg", ""))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "MALFORMED_JSON", "the request body is not valid JSON")
    # Only location, message and type: the input and context may hold anything, and echo it back.
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": _message(e), "type": str(e.get("type", ""))}
        for e in errors
    ]
    summary = "; ".join(f"{_location(e.get('loc', ()))}: {_message(e)}" for e in errors[:5])
    return error_response(422, "VALIDATION_ERROR", summary or "invalid request", details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code if 400 <= exc.status_code < 600 else 500
    code = CODE_BY_HTTP_STATUS.get(status, f"HTTP_{status}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ").lower()
    headers = dict(exc.headers) if exc.headers else {}
    if status == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(status, code, message, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method any route of this path accepts (Starlette names only the first route's)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, asyncpg.IntegrityConstraintViolationError)
    constraint = getattr(exc, "constraint_name", None) or ""
    if isinstance(exc, asyncpg.UniqueViolationError):
        code, message = CONSTRAINT_CODES.get(constraint, ("CONFLICT", "the resource already exists"))
        return error_response(409, code, message)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return error_response(409, "CONFLICT", "the resource is referenced by, or refers to, another one")
    log.warning("constraint %s refused a request: %s", constraint, exc)
    return error_response(400, "INVALID_REQUEST", "the request violates a constraint")


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database refused a value: %s", exc)
    return error_response(400, "INVALID_REQUEST", "a value in the request cannot be stored")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable: %r", exc)
    return error_response(
        503, "SERVICE_UNAVAILABLE", "the database is unavailable; retry later", headers={"Retry-After": "1"}
    )


async def _schema_missing(request: Request, exc: Exception) -> JSONResponse:
    # e.g. the binding service's migrations have not run yet: not ready, rather than broken
    log.error("database schema incomplete: %s", exc)
    return error_response(
        503, "SERVICE_UNAVAILABLE", "the database schema is not ready; retry later", headers={"Retry-After": "5"}
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", "internal error")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(asyncpg.IntegrityConstraintViolationError, _integrity_error)
    app.add_exception_handler(asyncpg.DataError, _data_error)
    app.add_exception_handler(asyncpg.UndefinedTableError, _schema_missing)
    for unavailable in (
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.InterfaceError,
        asyncpg.AdminShutdownError,
        # A failover under way: no node is the primary yet, or a pooled connection reaches the demoted one.
        asyncpg.TargetServerAttributeNotMatched,
        asyncpg.ReadOnlySQLTransactionError,
        ConnectionError,
        TimeoutError,
    ):
        app.add_exception_handler(unavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
