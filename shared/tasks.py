"""Ending asyncio tasks the same way everywhere: cancelled, and waited for until they are gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended (its cancellation swallowed, not the caller's)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """The result of `work`, or None if `stop` is set first (`work` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    await cancel(task)
    return None
