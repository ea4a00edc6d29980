"""What can go wrong in havipctl, and the exit status of each.

| status | meaning |
|---|---|
| 0 | success |
| 1 | the allocator answered with an error (`{"error": {code, message}}`), or with something that is not its API |
| 2 | bad usage: unknown command, missing or malformed argument, bad configuration value |
| 3 | the allocator (or, for `watch`, RabbitMQ) cannot be reached: connection refused, timeout, DNS |
| 4 | authentication failed: HTTP 401 (check the token), or RabbitMQ refused the login |
| 5 | `watch --count N --timeout S`: the time ran out before N events arrived |
| 70 | an unexpected internal error (a bug in havipctl; reported in one line, never a traceback) |
| 130 | interrupted (Ctrl-C) outside `watch` |
"""

from __future__ import annotations

from enum import IntEnum


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
    """An error havipctl reports in one line on stderr before exiting with `exit_code`."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(HavipctlError):
    """A configuration value (flag or environment variable) that cannot be used."""

    exit_code = ExitCode.USAGE


class Unreachable(HavipctlError):
    """No answer from the allocator or the broker: refused, timed out, unknown host."""

    exit_code = ExitCode.UNREACHABLE


class AuthenticationFailed(HavipctlError):
    exit_code = ExitCode.AUTHENTICATION


class ApiError(HavipctlError):
    """The allocator refused the request: its HTTP status and the code and message of its error body."""

    exit_code = ExitCode.API_ERROR

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.detail = message


class UnexpectedResponse(HavipctlError):
    """An answer that is not the allocator's API (not JSON, wrong shape): a proxy, or the wrong URL."""

    exit_code = ExitCode.API_ERROR


class WatchTimedOut(HavipctlError):
    exit_code = ExitCode.WATCH_TIMEOUT
