"""The binding service's book of watchers: who is alive on each segment, on a clock the test moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.core import Metric

from services.binding.metrics import WatchersCollector
from services.binding.watchers import WatcherBook
from shared.events import WatcherHeartbeat

STARTED = datetime(2026, 12, 3, 14, 0, tzinfo=UTC)


def beat(
    watcher_id: str,
    segment: str = "rack-1",
    *,
    sequence: int = 1,
    interval_s: float = 5.0,
    started_at: datetime = STARTED,
) -> WatcherHeartbeat:
    return WatcherHeartbeat(
        watcher_id=watcher_id,
        interface="eth0",
        segment=segment,
        interval_s=interval_s,
        started_at=started_at,
        sequence=sequence,
        kernel_drops=0,
        claims_published=0,
    )


def test_a_segment_no_watcher_spoke_for_is_unknown() -> None:
    assert WatcherBook().alive_by_segment(0.0) == {}


def test_watchers_count_alive_for_three_of_their_intervals() -> None:
    book = WatcherBook()
    assert book.heard(beat("a"), 100.0, 1e9) == "fresh"
    assert book.heard(beat("b"), 101.0, 1e9) == "fresh"
    assert book.heard(beat("c", "rack-2", interval_s=1.0), 101.0, 1e9) == "fresh"
    assert book.alive_by_segment(101.0) == {"rack-1": 2, "rack-2": 1}
    # rack-2's watcher beats every second: gone after 3 s; rack-1's every 5 s: alive until 15 s have passed.
    assert book.alive_by_segment(103.9) == {"rack-1": 2, "rack-2": 1}
    assert book.alive_by_segment(104.0) == {"rack-1": 2, "rack-2": 0}
    assert book.alive_by_segment(114.9) == {"rack-1": 2, "rack-2": 0}
    assert book.alive_by_segment(115.0) == {"rack-1": 1, "rack-2": 0}
    assert book.heard(beat("a", sequence=2), 115.0, 1e9) == "fresh"  # heard again: alive for 15 s more
    assert book.alive_by_segment(116.0) == {"rack-1": 1, "rack-2": 0}
    assert book.alive_by_segment(129.9) == {"rack-1": 1, "rack-2": 0}
    assert book.alive_by_segment(130.0) == {"rack-1": 0, "rack-2": 0}  # known segments stay, with none alive


def test_one_watcher_id_on_two_segments_counts_on_each() -> None:
    book = WatcherBook()
    book.heard(beat("a", "rack-1"), 0.0, 1e9)
    book.heard(beat("a", "rack-2"), 0.0, 1e9)
    assert book.alive_by_segment(1.0) == {"rack-1": 1, "rack-2": 1}


def test_a_late_redelivery_changes_nothing() -> None:
    book = WatcherBook()
    book.heard(beat("a", sequence=5), 0.0, 1e9)
    assert book.heard(beat("a", sequence=4), 10.0, 2e9) == "stale"
    assert book.heard(beat("a", sequence=5), 10.0, 2e9) == "stale"
    # The newest heartbeat still counts from when it was heard: a stale one renews nothing.
    assert book.alive_by_segment(15.0) == {"rack-1": 0}
    assert [w.heard_at_wall_s for w in book.watchers(10.0)] == [1e9]


def test_a_restarted_watcher_is_the_same_watcher() -> None:
    book = WatcherBook()
    book.heard(beat("a", sequence=40), 0.0, 1e9)
    assert book.heard(beat("a", sequence=1, started_at=STARTED + timedelta(minutes=5)), 1.0, 1e9) == "fresh"
    assert book.alive_by_segment(2.0) == {"rack-1": 1}


def test_two_processes_sending_as_one_watcher_are_told() -> None:
    book = WatcherBook()
    later = STARTED + timedelta(minutes=5)
    book.heard(beat("a", sequence=1, started_at=later), 0.0, 1e9)
    assert book.heard(beat("a", sequence=90, started_at=STARTED), 1.0, 1e9) == "shared_id"
    assert book.alive_by_segment(2.0) == {"rack-1": 1}  # they count as one: hence the warning


def test_a_watcher_silent_past_the_horizon_is_forgotten_and_its_segment_kept() -> None:
    book = WatcherBook(forget_after_s=60.0)
    book.heard(beat("a"), 0.0, 1e9)
    book.heard(beat("b"), 30.0, 1e9)
    assert [w.watcher_id for w in book.watchers(59.0)] == ["a", "b"]
    assert [w.watcher_id for w in book.watchers(60.0)] == ["b"]
    assert book.alive_by_segment(60.0) == {"rack-1": 0}


def samples(metrics: list[Metric], name: str) -> dict[tuple[str, ...], float]:
    (metric,) = (m for m in metrics if m.name == name)
    return {tuple(s.labels.values()): s.value for s in metric.samples}


def test_the_collector_exports_alive_per_segment_and_each_watchers_last_heartbeat() -> None:
    book = WatcherBook()
    book.heard(beat("a"), 0.0, 1_700_000_000.0)
    book.heard(beat("b"), 0.0, 1_700_000_001.5)
    book.heard(beat("c", "rack-2", interval_s=1.0), 0.0, 1_700_000_002.0)
    now = 4.0
    metrics = list(WatchersCollector(lambda: (book.alive_by_segment(now), book.watchers(now))).collect())
    assert samples(metrics, "havip_watchers_alive") == {("rack-1",): 2, ("rack-2",): 0}
    assert samples(metrics, "havip_watcher_last_heartbeat_timestamp_seconds") == {
        ("rack-1", "a"): 1_700_000_000.0,
        ("rack-1", "b"): 1_700_000_001.5,
        ("rack-2", "c"): 1_700_000_002.0,
    }
