"""The hop benchmark, CI-sized (bench/hops.py, three takeovers): the watcher and the binding export every hop of
`havip_claim_hop_seconds`, each takeover is timed at every hop, and the hops fit together — from the kernel
receive time they add up to the history's committed_at, and the consumer has the event after the relay sent it.
No timing is asserted: the machine is shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import hops

pytestmark = pytest.mark.e2e

PROBES = 3


async def test_takeovers_are_timed_at_every_hop_and_the_hops_add_up(tmp_path: Path) -> None:
    result = await hops.run(PROBES, n=0, background=0, workdir=tmp_path, quiet_wait_s=0)
    assert result["probes_timed_at_every_hop"] == PROBES
    # Kernel receive + read + sent + received + decided + stamped = the history row's committed_at: the services'
    # clocks and the database's agree, and no hop was negative (a negative one is counted as 0 and breaks it).
    assert result["chain_vs_committed_at_max_us"] < 5
    every_hop = [hop for hop, _, _ in hops.HOPS]
    for probe in result["per_probe"]:
        assert set(probe["hops_ms"]) == {*hops.SERVICE_HOPS["watcher"], *hops.SERVICE_HOPS["binding"], "consumed"}
        assert set(probe["hops_ms"]) == set(every_hop)
        assert all(value >= 0 for value in probe["hops_ms"].values()), probe  # the consumer after the relay
    for figures in (
        result["garp_to_consumer_ms"],
        result["reference_insert_ms"],
        result["reference_round_trip_ms"],
    ):
        assert figures["n"] == PROBES
    assert result["garp_to_consumer_ms"]["p50"] > result["garp_to_committed_at_ms"]["p50"]
    text = hops.report(result)
    assert all(f"  {hop} " in text for hop in every_hop)
