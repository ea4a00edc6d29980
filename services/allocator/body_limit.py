"""Refuse request bodies larger than the configured limit with the API's own 413 error body.

(FastAPI's built-in `max_body_size` answers a declared oversized body with a plain-text 413 of its own,
replacing whatever the exception handlers produced; this middleware keeps the error shape.)
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.allocator.exception_handlers import error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_body_bytes
            except ValueError:
                response = error_response(400, "BAD_REQUEST", "invalid Content-Length header")
                await response(scope, receive, send)
                return
            if too_large:
                await self._refuse(scope, receive, send)
                return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # raised inside the route's body read: the exception handlers answer it
                    raise HTTPException(413, self._message)
            return message

        await self.app(scope, counting_receive, send)

    @property
    def _message(self) -> str:
        return f"the request body exceeds {self.max_body_bytes} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "PAYLOAD_TOO_LARGE", self._message, headers={"Connection": "close"})
        await response(scope, receive, send)
