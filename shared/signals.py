"""SIGTERM and SIGINT end a service gracefully: they set its stop event, and the log says which came."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _received, sig, stop)


def restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)


def _received(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("%s received: stopping", sig.name)
    stop.set()


@contextlib.contextmanager
def stop_on_signals_while_starting(stop: asyncio.Event) -> Iterator[None]:
    """Under a server that handles the signals itself (uvicorn: `signal.signal`, acted on only once the
    application has started), a stop signal during start-up also sets `stop` — so that a start-up waiting for
    a dependency (a broker that is away) ends at once — and is then handed on to the server's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def received(sig: int, frame: FrameType | None) -> None:
        log.info("%s received while starting: stopping", signal.Signals(sig).name)
        loop.call_soon_threadsafe(stop.set)
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)

    for sig in STOP_SIGNALS:
        signal.signal(sig, received)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
