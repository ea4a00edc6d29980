"""Coalescing of repeated claims: the first is published at once, identical repeats within the window are
counted, anything that differs is never held back, refreshes still go out once per window."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from services.arp_watcher.claims import Claim
from services.arp_watcher.coalesce import Coalescer

A = bytes.fromhex("02000000000a")
B = bytes.fromhex("02000000000b")
VIP = int(IPv4Address("192.0.2.10"))
S = 1_000_000_000
T = 1_700_000_000 * S


def garp(mac: bytes, at: int, *, eth_src: bytes | None = None, vlan: int | None = None, ip: int = VIP) -> Claim:
    return Claim("garp_request", vlan, mac, eth_src or mac, ip, ip, at)


def test_keepalived_burst_is_published_once_and_counted() -> None:
    c = Coalescer()
    burst = [garp(A, T + i * 1000) for i in range(5)]
    assert c.admit(burst) == [burst[0]]
    assert c.coalesced == 4


def test_a_new_holder_a_spoofer_a_mismatch_and_another_vlan_are_never_held_back() -> None:
    c = Coalescer()
    first = garp(A, T)
    others = [garp(B, T + 1), garp(A, T + 2), garp(A, T + 3, eth_src=B), garp(A, T + 4, vlan=7)]
    assert c.admit([first, *others]) == [first, *others]
    assert c.coalesced == 0


def test_back_and_forth_within_the_window_is_published_each_time() -> None:
    c = Coalescer()
    flips = [garp(A, T), garp(B, T + 10), garp(A, T + 20), garp(B, T + 30)]
    assert c.admit(flips) == flips


def test_refreshes_go_out_once_per_window_with_the_repeats_folded_in() -> None:
    c = Coalescer(window_ns=S, spread=0)
    refreshes = [garp(A, T + i * S // 4) for i in range(9)]  # every 250 ms for 2 s
    out = c.admit(refreshes)
    assert [r.captured_at for r in out] == [T, T + S, T + 2 * S]
    assert [r.repeats for r in out] == [1, 4, 4]
    assert [r.renewal for r in out] == [False, True, True]  # the routine lane, after the first
    assert c.coalesced == 6


def test_renewals_of_many_addresses_started_together_are_spread_over_half_a_window() -> None:
    """A spoofer (or a server) announcing 1,000 addresses in the same instant, again every 20 ms: with every
    window alike all 1,000 renewals would fall due in the same 20 ms each second; lengthened by up to half a
    window per address, they flow evenly — about a tenth of them in any 50 ms — and no address is renewed sooner
    than the window or later than one and a half."""
    addresses = [VIP + i for i in range(1000)]
    c = Coalescer(window_ns=S)
    published: dict[int, list[int]] = {ip: [] for ip in addresses}
    renewals: list[int] = []
    for step in range(250):  # 5 s
        at = T + step * 20_000_000
        for claim in c.admit([garp(A, at, ip=ip) for ip in addresses]):
            published[claim.sender_ip].append(claim.captured_at)
            if claim.renewal:
                renewals.append(claim.captured_at)
    per_50ms = Counter((t - T) // 50_000_000 for t in renewals)
    assert max(per_50ms.values()) <= 0.15 * len(addresses)
    for times in published.values():
        gaps = [b - a for a, b in pairwise(times)]
        assert len(times) >= 4
        assert all(S <= gap <= 3 * S // 2 + 20_000_000 for gap in gaps)


def test_without_spread_they_all_fall_due_together() -> None:
    c = Coalescer(window_ns=S, spread=0)
    addresses = [VIP + i for i in range(1000)]
    c.admit([garp(A, T, ip=ip) for ip in addresses])
    assert len(c.admit([garp(A, T + S, ip=ip) for ip in addresses])) == len(addresses)


def test_a_refresh_after_a_quiet_spell_is_still_a_renewal_and_a_new_claimant_never_is() -> None:
    c = Coalescer(window_ns=S, memory_ns=60 * S)
    assert [r.renewal for r in c.admit([garp(A, T)])] == [False]
    # keepalived's garp_master_refresh: long after the window, the same holder again
    assert [r.renewal for r in c.admit([garp(A, T + 30 * S)])] == [True]
    assert [r.renewal for r in c.admit([garp(B, T + 31 * S)])] == [False]  # the takeover: urgent
    c.admit([garp(A, T + 200 * S, ip=VIP + 1)])  # time passes: entries older than memory_ns are swept
    assert [r.renewal for r in c.admit([garp(B, T + 201 * S)])] == [False]  # forgotten: published as new


def test_zero_window_publishes_every_frame() -> None:
    c = Coalescer(window_ns=0)
    burst = [garp(A, T)] * 3
    assert c.admit(burst) == burst


def test_the_table_is_swept_and_bounded() -> None:
    c = Coalescer(window_ns=S, max_addresses=100, memory_ns=5 * S)
    c.admit([garp(A, T, ip=VIP + i) for i in range(50)])
    assert len(c) == 50
    c.admit([garp(A, T + 2 * S, ip=VIP + 1000)])  # within memory_ns: kept, to recognise renewals
    assert len(c) == 51
    c.admit([garp(A, T + 7 * S, ip=VIP + 1001)])  # memory_ns after them: the old entries go
    assert len(c) == 1
    flood = [garp(A, T + 8 * S, ip=VIP + i) for i in range(500)]
    assert c.admit(flood) == flood  # more addresses than the bound: nothing is held back
    assert len(c) <= 100


@given(
    st.lists(
        st.tuples(st.sampled_from([A, B]), st.sampled_from([A, B]), st.integers(0, 3), st.integers(0, 3 * S)),
        max_size=60,
    )
)
def test_no_change_of_claimant_is_ever_held_back(frames: list[tuple[bytes, bytes, int, int]]) -> None:
    """Property: every claim that differs from the previous claim of its address is published, and every frame is
    either published or counted."""
    c = Coalescer(window_ns=S)
    claims = [
        garp(mac, T + at, eth_src=eth, ip=VIP + addr) for mac, eth, addr, at in sorted(frames, key=lambda f: f[3])
    ]
    out = c.admit(claims)
    previous: dict[int, tuple[bytes, bytes]] = {}
    last_published: dict[int, tuple[bytes, bytes]] = {}
    for claim in out:  # a renewal is exactly a republished claim of the last published claimant
        identity = (claim.sender_mac, claim.eth_src)
        assert claim.renewal == (last_published.get(claim.sender_ip) == identity)
        last_published[claim.sender_ip] = identity
    must = []
    for claim in claims:
        identity = (claim.sender_mac, claim.eth_src)
        if previous.get(claim.sender_ip) != identity:
            must.append(claim)
        previous[claim.sender_ip] = identity
    published = [claim._replace(repeats=1, renewal=False) for claim in out]
    assert all(claim in published for claim in must)
    assert len(out) + c.coalesced == len(claims)
    assert sum(claim.repeats for claim in out) <= len(claims)
