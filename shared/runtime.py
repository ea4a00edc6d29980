"""How every service process runs: one stop event, set by SIGTERM or SIGINT; the service's work run until it
returns; and the exit status.

The first signal stops the service gracefully (the work under way finishes, what is committed is published);
it is then no longer caught, so that a second one ends a shutdown that hangs (SIGINT: exit status 130).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.signals import restore_signals, stop_on_signals
from shared.tasks import cancel

log = logging.getLogger(__name__)

S = TypeVar("S")

EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """The service cannot start: its message is logged, and the process ends with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def serve(
    run: Callable[[S, asyncio.Event], Awaitable[int | None]],
    settings: S,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run `run(settings, stop)` in an event loop of its own (made by `loop_factory`, default asyncio's) until
    it returns; returns the exit status — what `run` returned (None: 0), a StartupError's code, or 130 when a
    second SIGINT ended the shutdown."""

    async def until_done() -> int | None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        released = asyncio.create_task(_release_signals_once(stop), name="release stop signals")
        try:
            return await run(settings, stop)
        finally:
            if not released.done():
                await cancel(released)
                restore_signals()

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(until_done()) or 0
    except StartupError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _release_signals_once(stop: asyncio.Event) -> None:
    await stop.wait()
    restore_signals()
