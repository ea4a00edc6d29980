"""The refusal audit's pacer: at most `rate` rows a second, never more than `burst` at once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.binding.audit_pacing import AuditPacer


def test_a_full_bucket_gives_a_burst_then_rows_at_the_rate() -> None:
    pacer = AuditPacer(100, 10)
    assert pacer.take(1000, 0.0) == 10
    assert pacer.take(1000, 0.0) == 0
    assert pacer.take(1000, 0.05) == 5  # 50 ms at 100/s
    assert pacer.take(1000, 10.0) == 10  # a long pause refills no more than the burst
    assert pacer.take(3, 20.0) == 3


def test_the_default_burst_is_a_tenth_of_a_second() -> None:
    assert AuditPacer(100).burst == 10
    assert AuditPacer(5).burst == 1


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (10, 0)])
def test_nonsense_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        AuditPacer(rate, burst)


@given(
    rate=st.floats(min_value=0.5, max_value=10_000),
    burst=st.integers(min_value=1, max_value=1000),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.integers(min_value=0, max_value=10_000)), max_size=50
    ),
)
def test_over_any_span_no_more_than_burst_plus_rate_times_span(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    pacer = AuditPacer(rate, burst)
    now = 0.0
    granted = 0
    for gap, wanted in steps:
        now += gap
        got = pacer.take(wanted, now)
        assert 0 <= got <= min(wanted, burst)
        granted += got
    assert granted <= burst + rate * now + 1e-6
