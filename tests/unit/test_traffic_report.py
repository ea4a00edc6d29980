"""tests/lab/traffic_report.py: where datagrams may land given when the client's path changed, and the gap the
client saw (the judge of the traffic e2e test, so it must itself be able to say no)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tests.lab.traffic_report import (
    Answer,
    Arrival,
    PathChange,
    Sent,
    TrafficLog,
    allowed_targets,
    misdirected,
    read_log,
    silence,
)

MS = 1_000_000
# cvm1 from 100..102 ms, cvm2 from 500..505 ms
CHANGES = [PathChange("cvm1", 100 * MS, 102 * MS), PathChange("cvm2", 500 * MS, 505 * MS)]


def test_before_any_change_the_path_leads_nowhere() -> None:
    assert allowed_targets(CHANGES, 10 * MS, 50 * MS) == {None}


def test_between_changes_only_the_programmed_target() -> None:
    assert allowed_targets(CHANGES, 200 * MS, 300 * MS) == {"cvm1"}
    assert allowed_targets(CHANGES, 600 * MS, 601 * MS) == {"cvm2"}


def test_an_interval_overlapping_a_change_allows_both_sides() -> None:
    assert allowed_targets(CHANGES, 499 * MS, 501 * MS) == {"cvm1", "cvm2"}
    assert allowed_targets(CHANGES, 490 * MS, 499 * MS) == {"cvm1"}  # change not started yet
    # A datagram held unresolved from before the first change and released by it.
    assert allowed_targets(CHANGES, 50 * MS, 103 * MS) == {None, "cvm1"}


def log_of(*arrivals: tuple[int, str, int, int]) -> TrafficLog:
    """(seq, server, sent at ms, arrived at ms) per datagram."""
    log = TrafficLog()
    for seq, server, sent_ms, at_ms in arrivals:
        log.sent[seq] = Sent(seq, sent_ms * MS, sent_ms * MS + 50_000)
        log.arrivals.append(Arrival(seq, server, at_ms * MS))
    return log


def test_arrivals_that_follow_the_path_are_not_misdirected() -> None:
    log = log_of((1, "cvm1", 60, 102), (2, "cvm1", 300, 300), (3, "cvm1", 499, 501), (4, "cvm2", 503, 503))
    assert misdirected(log, CHANGES) == []


def test_an_arrival_at_the_old_holder_after_the_change_is_misdirected() -> None:
    log = log_of((1, "cvm1", 300, 300), (2, "cvm1", 600, 600))
    assert [a.seq for a in misdirected(log, CHANGES)] == [2]


def test_an_arrival_before_anyone_was_programmed_is_misdirected() -> None:
    assert [a.seq for a in misdirected(log_of((1, "cvm1", 20, 21)), CHANGES)] == [1]


def test_an_arrival_at_a_never_programmed_host_is_misdirected() -> None:
    assert [a.seq for a in misdirected(log_of((1, "cvm3", 300, 300)), CHANGES)] == [1]


@given(st.integers(0, 1000), st.integers(0, 50))
def test_the_target_in_effect_is_always_allowed(start_ms: int, length_ms: int) -> None:
    start, end = start_ms * MS, (start_ms + length_ms) * MS
    in_effect_at_end = None
    for change in CHANGES:
        if change.finished <= end:
            in_effect_at_end = change.target
    assert in_effect_at_end in allowed_targets(CHANGES, start, end)


def test_silence_counts_unanswered_datagrams_between_old_and_new_holder() -> None:
    log = TrafficLog()
    for seq in range(10):
        log.sent[seq] = Sent(seq, seq * 10 * MS, seq * 10 * MS + 1)
    log.answers = [Answer(0, "cvm1", 1 * MS), Answer(1, "cvm1", 11 * MS), Answer(7, "cvm2", 71 * MS)]
    gap = silence(log, "cvm1", "cvm2")
    assert gap is not None
    assert (gap.last_old.seq, gap.first_new.seq, gap.unanswered, gap.duration_ns) == (1, 7, 5, 60 * MS)
    assert silence(log, "cvm2", "cvm1") is None


def test_read_log_parses_probe_lines_and_skips_a_cut_last_line() -> None:
    client = [
        json.dumps({"event": "ready"}),
        json.dumps({"event": "sent", "seq": 0, "before": 5, "after": 6}),
        json.dumps({"event": "answer", "seq": 0, "server": "cvm1", "at": 9}),
        '{"event": "sent", "se',
    ]
    servers = {"cvm1": [json.dumps({"event": "arrival", "seq": 0, "at": 7}), json.dumps({"event": "answered"})]}
    log = read_log(client, servers)
    assert log.sent == {0: Sent(0, 5, 6)}
    assert log.answers == [Answer(0, "cvm1", 9)]
    assert log.arrivals == [Arrival(0, "cvm1", 7)]
