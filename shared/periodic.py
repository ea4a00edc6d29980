"""Work that recurs every few seconds for as long as a service runs, written once: a failed run is logged and
the next one comes as usual."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.backoff import interruptible_sleep
from shared.runtime import StartupError

log = logging.getLogger(__name__)


async def run_periodically(
    work: Callable[[], Awaitable[object]],
    interval_s: float,
    *,
    what: str,
    stop: asyncio.Event | None = None,
    at_start: bool = False,
    logger: logging.Logger = log,
) -> None:
    """Run `work` every `interval_s` (counted from the end of one run to the start of the next; the first run
    at once with `at_start`, else after one interval) until `stop` is set or the task is cancelled.

    A run that fails is logged with its trace, and the next run comes at the next interval; a failure that
    repeats the one before (the same error, e.g. a database that is away) is not logged again, and the first
    run that works after failures says so — a run every second would otherwise fill the log during an outage.
    """
    failing: str | None = None
    repeats = 0
    pause = interruptible_sleep(stop)
    if not at_start:
        await pause(interval_s)
    while stop is None or not stop.is_set():
        try:
            await work()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if reason != failing:
                if isinstance(exc, StartupError):  # already in words (a right the broker refuses): no trace
                    logger.error("%s failed; trying again every %g s: %s", what, interval_s, exc)
                else:
                    logger.error("%s failed; trying again every %g s", what, interval_s, exc_info=exc)
                failing, repeats = reason, 0
            else:
                repeats += 1
        else:
            if failing is not None:
                logger.info("%s works again (after %d more failures like the one logged)", what, repeats)
                failing, repeats = None, 0
        await pause(interval_s)
