"""SIGTERM and SIGINT end a service gracefully: they set its stop event, and the log says which came."""

from __future__ import annotations

import asyncio
import logging
import signal

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
