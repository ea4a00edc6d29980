"""Refused claims are summed up in the binding service's log — one line per interval, by reason — rather than
one line per frame or none at all."""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest

from services.binding.settings import BindingSettings
from shared.messaging import Broker
from tests.integration.binding_support import World, claims_event
from tests.waiting import eventually

BINDING_SETTINGS = {"refusal_log_interval_s": 1.0}


async def test_refused_claims_are_summed_up_in_one_line_per_interval(
    binding: BindingSettings, publisher: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    spoofer = "02:ee:ee:ee:ee:01"
    await publisher.publish(claims_event(w.observed(spoofer), w.observed(spoofer)))  # two frames, unknown MAC
    await publisher.publish(w.claim(w.outsider.mac))  # another subnet's instance

    def summed() -> Counter[str]:
        total: Counter[str] = Counter()
        for record in summaries(caplog):
            total.update(record.__dict__["frames_by_reason"])
        return total

    # The frames may fall into one interval or two: every frame is in exactly one line.
    await eventually(lambda: summed() == {"unknown_mac": 2, "other_subnet": 1}, timeout=30, what="the summaries")
    for record in summaries(caplog):
        assert SUMMARY.fullmatch(record.getMessage()), record.getMessage()


SUMMARY = re.compile(r"claims refused in the last 1 s: \d+ frames from \d+ claimants \(address, MAC\)")


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("claims refused")]
