"""What can go wrong in havipctl, the exit status of each, and the code it has in `--json` error output.

| status | meaning | `--json` code |
|---|---|---|
| 0 | success | — |
| 1 | the allocator refused (its code), or answered without its error shape | e.g. `ADDRESS_IN_USE`; `HTTP_502` |
| 1 | the answer is not the allocator's API at all (not JSON, wrong shape) | `UNEXPECTED_RESPONSE` |
| 2 | bad usage: unknown command, missing or malformed argument, bad configuration value | `USAGE_ERROR` |
| 3 | the allocator (or, for `watch`, RabbitMQ) cannot be reached: refused, timeout, DNS | `UNREACHABLE` |
| 4 | authentication failed: HTTP 401 (check the token), or RabbitMQ refused the login | `AUTHENTICATION_FAILED` |
| 5 | `watch --count N --timeout S`: the time ran out before N events arrived | `WATCH_TIMEOUT` |
| 70 | an unexpected internal error (a bug in havipctl; one line, never a traceback) | `INTERNAL_ERROR` |
| 130 | interrupted (Ctrl-C) outside `watch` | `INTERRUPTED` |
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    API_ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    AUTHENTICATION = 4
    WATCH_TIMEOUT = 5
    INTERNAL = 70
    INTERRUPTED = 130


class HavipctlError(Exception):
    """An error havipctl reports before exiting with `exit_code`: one line on stderr, or with --json
    `{"error": {"code": "UPPER_SNAKE", "message": "..."}}` (as_json)."""

    exit_code: ExitCode = ExitCode.INTERNAL
    code: str = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class UsageError(HavipctlError):
    """A configuration value (flag or environment variable) that cannot be used."""

    exit_code = ExitCode.USAGE
    code = "USAGE_ERROR"


class BadArguments(UsageError):
    """argparse refused the command line: the parser's program name and usage come with its message."""

    def __init__(self, prog: str, problem: str, usage: str) -> None:
        super().__init__(f"{prog}: {problem}")
        self.prog = prog
        self.problem = problem
        self.usage = usage

    def as_text(self) -> str:
        """Exactly what argparse itself prints: the usage, then `prog: error: message`."""
        return f"{self.usage}{self.prog}: error: {self.problem}\n"


class Unreachable(HavipctlError):
    """No answer from the allocator or the broker: refused, timed out, unknown host."""

    exit_code = ExitCode.UNREACHABLE
    code = "UNREACHABLE"


class AuthenticationFailed(HavipctlError):
    exit_code = ExitCode.AUTHENTICATION
    code = "AUTHENTICATION_FAILED"


class ApiError(HavipctlError):
    """The allocator refused the request: its HTTP status and the code, message (and details) of its error."""

    exit_code = ExitCode.API_ERROR

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.detail = message
        self.details = details

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.detail, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class UnexpectedResponse(HavipctlError):
    """An answer that is not the allocator's API (not JSON, wrong shape): a proxy, or the wrong URL."""

    exit_code = ExitCode.API_ERROR
    code = "UNEXPECTED_RESPONSE"


class WatchTimedOut(HavipctlError):
    exit_code = ExitCode.WATCH_TIMEOUT
    code = "WATCH_TIMEOUT"


class Interrupted(HavipctlError):
    exit_code = ExitCode.INTERRUPTED
    code = "INTERRUPTED"


class InternalError(HavipctlError):
    """A bug in havipctl, reported like any other error: one line (or one JSON object), never a traceback."""
