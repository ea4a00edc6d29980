"""Bearer-token authentication of every /v1 route, and its refusal of unknown query parameters.

The token check runs first in each route's handler, before the body is parsed or validated, so an
unauthenticated caller learns nothing but 401 (not even whether its JSON was valid). Then a query parameter
the route does not declare is refused (422), as unknown body fields are: a misspelled filter such as
`?subnetid=` must not silently list everything.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from services.allocator.errors import Unauthenticated
from services.allocator.schemas import ERROR_RESPONSES

log = logging.getLogger(__name__)

# For the OpenAPI document (security scheme "bearerAuth"); the check itself is TokenAuth's.
bearer_scheme = HTTPBearer(scheme_name="bearerAuth", auto_error=False)


class TokenAuth:
    """Compares the presented token with the configured one in constant time; None disables the check."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            return
        if not authorization:
            raise Unauthenticated("missing Authorization: Bearer <token> header")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("expected Authorization: Bearer <token>")
        # Header values arrive latin-1 decoded; compare bytes (compare_digest refuses non-ASCII str).
        if not hmac.compare_digest(presented.strip().encode("latin-1", "replace"), self._token):
            raise Unauthenticated("invalid token")


def _query_parameters(dependant: Dependant) -> frozenset[str]:
    """Names of the query parameters a route declares, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_parameters(sub)
    return frozenset(names)


class AuthenticatedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        declared = _query_parameters(self.dependant)

        async def authenticated(request: Request) -> Response:
            auth: TokenAuth = request.app.state.auth
            auth.check(request.headers.get("authorization"))
            unknown = sorted(set(request.query_params) - declared)
            if unknown:
                raise RequestValidationError(
                    [
                        {
                            "type": "extra_forbidden",
                            "loc": ("query", name),
                            "msg": "this route has no such parameter",
                        }
                        for name in unknown
                    ]
                )
            return await handler(request)

        return authenticated


def api_router(prefix: str, tag: str) -> APIRouter:
    """A /v1 router: every route authenticated, documented with the bearer scheme and the error shape."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        route_class=AuthenticatedRoute,
        dependencies=[Security(bearer_scheme)],
        responses=ERROR_RESPONSES,
    )
