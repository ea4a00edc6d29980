"""Waiting for a condition with a deadline, instead of sleeping a fixed time: the condition is polled until it
holds; past the deadline a TimeoutError names what was awaited. `eventually` is for coroutines, and
`eventually_sync` for threads and plain functions."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

T = TypeVar("T")


def _polling(timeout: float, interval: float, what: str) -> dict[str, Any]:
    """Tenacity's arguments: again while the result is false, every `interval` s, until `timeout` s have passed.
    An exception of the condition is not retried: it ends the wait."""

    def give_up(state: RetryCallState) -> NoReturn:
        raise TimeoutError(f"not within {timeout} s: {what}")

    return {
        "retry": retry_if_result(lambda result: not result),
        "wait": wait_fixed(interval),
        "stop": stop_after_delay(timeout),
        "retry_error_callback": give_up,
    }


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 20.0,  # noqa: ASYNC109 - a deadline polled between checks, not a cancellation
    interval: float = 0.02,
    what: str,
) -> None:
    """Until `predicate` (a function or a coroutine function) returns true."""

    async def holds() -> bool:
        result = predicate()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    await AsyncRetrying(**_polling(timeout, interval, what))(holds)


def eventually_sync(
    probe: Callable[[], T | None],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str,
) -> T:
    """Until `probe` returns a true value, which is returned."""
    return cast("T", Retrying(**_polling(timeout, interval, what))(probe))  # a true value, so never None
