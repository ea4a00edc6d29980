"""shared/hops.py: the hop histogram every service exports, and the time arithmetic its hops rest on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from shared.hops import BINDING_HOPS, HOP_BUCKETS, WATCHER_HOPS, claim_hops, datetime_ns, seconds_between


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)))
def test_datetime_ns_is_exact_to_the_microsecond(at: datetime) -> None:
    ns = datetime_ns(at)
    assert ns % 1000 == 0
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000) == at


def test_a_hop_whose_end_is_behind_its_start_counts_as_zero() -> None:
    assert seconds_between(2_000_000, 3_500_000) == 0.0015
    assert seconds_between(3_500_000, 2_000_000) == 0.0


def test_every_hop_is_exported_from_the_start_with_sub_millisecond_buckets() -> None:
    registry = CollectorRegistry()
    claim_hops(WATCHER_HOPS, registry)
    for hop in WATCHER_HOPS:
        assert registry.get_sample_value("havip_claim_hop_seconds_count", {"hop": hop}) == 0
    assert registry.get_sample_value("havip_claim_hop_seconds_count", {"hop": BINDING_HOPS[0]}) is None
    assert sum(bound < 0.001 for bound in HOP_BUCKETS) >= 6
    assert list(HOP_BUCKETS) == sorted(set(HOP_BUCKETS))
