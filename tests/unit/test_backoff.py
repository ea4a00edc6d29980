"""shared.backoff: a dependency waited for as long as it takes, what is wrong said once; work under way tried at
once and retried only after it failed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from tenacity import AsyncRetrying, RetryError

from shared.backoff import at_once_then_retrying, failure_of, retrying_with_backoff, wait_until_available


def describe(exc: BaseException) -> str:
    return f"it says {exc}"


async def test_each_reason_is_said_once_and_the_answer_is_returned(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.backoff")
    failures = [
        OSError("refused"),
        OSError("refused"),
        OSError("refused"),
        TimeoutError("late"),
        OSError("refused"),
    ]

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "connection"

    result = await asyncio.wait_for(
        wait_until_available(
            attempt, what="Dependency", unavailable=lambda _exc: True, describe=describe, max_delay_s=0.01
        ),
        10,
    )
    assert result == "connection"
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    again = "; trying again with back-off (up to 0 s) until it answers"
    assert said == [
        ("WARNING", "it says refused" + again),
        ("WARNING", "it says late" + again),
        ("WARNING", "it says refused" + again),  # changed again: said again
        ("INFO", "connected to dependency"),
    ]


async def test_an_answer_at_once_is_not_remarked_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.backoff")

    async def attempt() -> int:
        return 1

    assert await wait_until_available(attempt, what="X", unavailable=lambda _exc: True, describe=describe) == 1
    assert caplog.records == []


async def test_an_error_that_waiting_cannot_mend_is_raised_at_once() -> None:
    attempts = 0

    async def attempt() -> int:
        nonlocal attempts
        attempts += 1
        raise ValueError("a URL that cannot be parsed")

    with pytest.raises(ValueError, match="cannot be parsed"):
        await wait_until_available(
            attempt, what="X", unavailable=lambda exc: isinstance(exc, OSError), describe=describe
        )
    assert attempts == 1


async def test_a_stop_ends_the_wait_even_during_an_attempt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.backoff")
    stop = asyncio.Event()
    started = asyncio.Event()

    async def attempt() -> int:  # a host that accepts the connection and never answers
        started.set()
        await asyncio.Event().wait()
        return 1

    waiting = asyncio.create_task(
        wait_until_available(attempt, what="X", unavailable=lambda _exc: True, describe=describe, stop=stop)
    )
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(waiting, 10) is None
    assert [r.getMessage() for r in caplog.records] == ["stopped before X answered"]


def counting_retrying(told: list[str], attempts: int = 5) -> Callable[[], AsyncRetrying]:
    """retrying_with_backoff that records each failure it is told of and gives up after `attempts` tries."""

    def retrying() -> AsyncRetrying:
        told.append("made")
        return retrying_with_backoff(
            retry=lambda exc: isinstance(exc, OSError),
            initial_s=0.001,
            max_s=0.001,
            before_sleep=lambda state: told.append(f"failed: {failure_of(state)}"),
            stop_on=lambda state: state.attempt_number >= attempts,
        )

    return retrying


async def test_work_that_succeeds_at_once_never_builds_the_retrying() -> None:
    told: list[str] = []

    async def work() -> str:
        return "done"

    assert await at_once_then_retrying(work, counting_retrying(told)) == "done"
    assert told == []


async def test_the_first_failure_is_the_retryings_first_attempt() -> None:
    told: list[str] = []
    outcomes: list[Exception | str] = [OSError("one"), OSError("two"), "done"]
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await at_once_then_retrying(work, counting_retrying(told)) == "done"
    assert calls == 3  # no extra call: the failure outside the retrying counts as its first attempt
    assert told == ["made", "failed: one", "failed: two"]


async def test_a_failure_the_retrying_does_not_retry_is_raised_as_it_is() -> None:
    told: list[str] = []

    async def work() -> str:
        raise ValueError("not retried")

    with pytest.raises(ValueError, match="not retried"):
        await at_once_then_retrying(work, counting_retrying(told))
    assert told == ["made"]


async def test_the_retrying_still_gives_up_after_its_attempts_counting_the_first() -> None:
    told: list[str] = []
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        raise OSError(f"attempt {calls}")

    with pytest.raises(RetryError):
        await at_once_then_retrying(work, counting_retrying(told, attempts=3))
    assert calls == 3
