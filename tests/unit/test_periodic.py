"""shared.periodic: work every interval until stopped, surviving its failures without filling the log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.periodic import run_periodically
from tests.waiting import eventually


async def test_work_runs_every_interval_until_stopped() -> None:
    stop = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            stop.set()

    await asyncio.wait_for(run_periodically(work, 0.01, what="counting", stop=stop), 10)
    assert runs == 3  # the stop ends it: no run after


async def test_the_first_run_comes_at_once_only_when_asked() -> None:
    stop = asyncio.Event()
    runs: list[str] = []

    async def work() -> None:
        runs.append("run")
        stop.set()

    # An interval far beyond the deadline: the run comes at once, and its stop ends the wait that follows.
    await asyncio.wait_for(run_periodically(work, 3600, what="early", stop=stop, at_start=True), 10)
    assert runs == ["run"]
    # Without `at_start`, the first run waits an interval, which the stop (already set) cuts short.
    await asyncio.wait_for(run_periodically(work, 3600, what="late", stop=stop), 10)
    assert runs == ["run"]


async def test_a_failure_is_logged_once_while_it_repeats_and_the_recovery_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shared.periodic")
    stop = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise ConnectionRefusedError("database away")
        if runs == 6:
            raise ValueError("something else")

    task = asyncio.create_task(run_periodically(work, 0.01, what="the chore", stop=stop))
    await eventually(lambda: runs >= 8, what="runs after the failures")
    stop.set()
    await asyncio.wait_for(task, 10)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[:3] == [
        ("ERROR", "the chore failed; trying again every 0.01 s"),
        ("INFO", "the chore works again (after 3 more failures like the one logged)"),
        ("ERROR", "the chore failed; trying again every 0.01 s"),
    ]
    assert said[3] == ("INFO", "the chore works again (after 0 more failures like the one logged)")
    assert caplog.records[0].exc_info is not None  # the trace of the first failure
    assert len(said) == 4


async def test_cancelling_ends_it() -> None:
    async def work() -> None:
        pass

    task = asyncio.create_task(run_periodically(work, 0.01, what="forever"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
