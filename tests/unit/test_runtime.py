"""shared.runtime.serve: the service's work run with a stop event, and the exit status it ends with."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest

from shared.runtime import StartupError, serve


async def returns(code: int | None, stop: asyncio.Event) -> int | None:
    assert not stop.is_set()
    return code


def test_the_exit_status_is_what_the_work_returned() -> None:
    assert serve(returns, 3) == 3
    assert serve(returns, None) == 0


def test_a_startup_error_is_logged_and_ends_with_its_exit_status(caplog: pytest.LogCaptureFixture) -> None:
    async def cannot_start(_settings: str, _stop: asyncio.Event) -> None:
        raise StartupError("no interface 'nosuch0'", 2)

    assert serve(cannot_start, "settings") == 2
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("ERROR", "no interface 'nosuch0'")]


def test_the_stop_signals_are_handled_as_before_once_it_returns() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    serve(returns, None)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigterm_sets_the_stop_event_and_the_log_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.signals")

    async def stopped_by_sigterm(_settings: None, stop: asyncio.Event) -> int:
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
        return 0

    assert serve(stopped_by_sigterm, None) == 0
    assert "SIGTERM received: stopping" in caplog.text
