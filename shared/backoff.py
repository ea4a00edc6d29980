"""Waiting and retrying, one policy for every service (tenacity underneath).

A dependency (the broker, the database) is waited for as long as it takes: what is wrong is said once, in an
operator's words, and again only when it changes; the attempts back off exponentially with full jitter, so that
a fleet restarted together does not come back in lockstep; a stop event ends the wait at once. Work under way
(a publish, a batch of messages) is retried with the same jittered back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential
from tenacity.wait import wait_base

from shared.tasks import until_stopped

log = logging.getLogger(__name__)

T = TypeVar("T")

# Connection waits: the first attempts come quickly (a dependency starting beside the service), later ones at
# most this far apart.
WAIT_INITIAL_S = 0.5
WAIT_MAX_S = 30.0


def jittered(initial_s: float, max_s: float) -> wait_base:
    """Exponential back-off from `initial_s` up to `max_s`, each delay drawn at random below its bound."""
    return wait_random_exponential(multiplier=initial_s, max=max_s)


def interruptible_sleep(
    stop: asyncio.Event | None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> Callable[[float], Awaitable[None]]:
    """`sleep`, ended early when `stop` is set."""

    async def pause(seconds: float) -> None:
        if stop is None:
            await sleep(seconds)
            return
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(sleep(seconds))]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    return pause


def failure_of(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def is_failure(exc: BaseException) -> bool:
    """An error worth another attempt: not a cancellation, not an interpreter exit."""
    return isinstance(exc, Exception)


async def wait_until_available(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    unavailable: Callable[[BaseException], bool],
    describe: Callable[[BaseException], str],
    stop: asyncio.Event | None = None,
    max_delay_s: float = WAIT_MAX_S,
    logger: logging.Logger = log,
) -> T | None:
    """`attempt()`'s result (never None) once `what` answers, for as long as it takes; None if `stop` was set
    first — it ends an attempt under way too — which the log says. Errors for which `unavailable` is false end
    the wait and are raised."""
    said: list[str] = []

    def tell(state: RetryCallState) -> None:
        exc = failure_of(state)
        reason = describe(exc) if exc is not None else "no answer"
        if said[-1:] != [reason]:
            logger.warning("%s; trying again with back-off (up to %.0f s) until it answers", reason, max_delay_s)
            said.append(reason)

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: is_failure(exc) and unavailable(exc)),
        wait=jittered(WAIT_INITIAL_S, max_delay_s),
        before_sleep=tell,
        reraise=True,
    )
    waiting: Coroutine[Any, Any, T] = retrying(attempt)
    result = await waiting if stop is None else await until_stopped(waiting, stop)
    if result is None:
        logger.info("stopped before %s answered", what)
        return None
    if said:
        logger.info("connected to %s", what.lower())
    return result


def retrying_with_backoff(
    *,
    retry: Callable[[BaseException], bool],
    initial_s: float,
    max_s: float,
    before_sleep: Callable[[RetryCallState], None],
    stop_on: Callable[[RetryCallState], bool] = lambda _state: False,
    stop: asyncio.Event | None = None,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncRetrying:
    """Retrying for work under way: failures for which `retry` is true are tried again after a jittered
    back-off (cut short by `stop`, which also ends the retries; or by `pause`, a sleep that may end early — e.g.
    shared.messaging.Broker.pause, when the broker is back), until `stop_on` says enough (then
    tenacity.RetryError); any other failure, and a cancellation, is raised at once."""
    return AsyncRetrying(
        retry=retry_if_exception(lambda exc: is_failure(exc) and retry(exc)),
        wait=jittered(initial_s, max_s),
        stop=lambda state: (stop is not None and stop.is_set()) or stop_on(state),
        sleep=interruptible_sleep(stop, pause),
        before_sleep=before_sleep,
    )


async def at_once_then_retrying(work: Callable[[], Awaitable[T]], retrying: Callable[[], AsyncRetrying]) -> T:
    """`work()` once; only if that fails, under `retrying()`, whose first attempt is that same failure — the
    same retries, logs and counts as `retrying()(work)`. Tenacity's bookkeeping costs tens of microseconds a
    call, which a hot path (a claim's publish, a batch's handling) then pays only when something went wrong."""
    first: BaseException | None = None
    try:
        return await work()
    except Exception as exc:
        first = exc

    async def again() -> T:
        nonlocal first
        if first is not None:
            failed, first = first, None
            raise failed
        return await work()

    result: T = await retrying()(again)
    return result
