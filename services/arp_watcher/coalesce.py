"""Coalescing of repeated claims (pure; runs in the capture thread).

keepalived announces a takeover with a burst of identical gratuitous ARPs (5 at once, 5 more after
`garp_master_delay`), and a holder refreshes its claim periodically: deciding each copy again costs the binding
service work and changes nothing. For each address on a VLAN, the first claim is published at once; a claim
identical to the last published one for that address (same sender MAC, Ethernet source and VLAN) captured
within `window_ns` of it is only counted, and folded into the next published one (`repeats`). A claim that
differs in any of those fields — a new holder, a spoofer, a mismatched frame — is never held back, and a
holder's refreshes still go out once per window, marked as renewals (`Claim.renewal`): the publisher sends
them in the routine lane, behind any change of claimant. To tell a renewal from a new claimant, the last
published claim of an address is remembered for `memory_ns` (at least the window; default 60 s, longer than
keepalived's usual `garp_master_refresh`).

The window of each address is lengthened by up to `spread` of it (0.5: 1 to 1.5 s), by a hash of the address:
when a flood — or a server announcing all its addresses at once — starts many addresses at the same moment,
their renewals would otherwise all fall due together every window, and a thousand claims would reach the
binding service at once, in front of whatever takeover comes then (docs/benchmarks.md, the flood); spread, they
flow evenly.

Memory is bounded: entries older than the window are swept, and if more addresses than `max_addresses` are
claimed within one window the table is emptied (which only means the next claims are published, never that
one is held back).
"""

from __future__ import annotations

from typing import Final

from .claims import Claim

DEFAULT_WINDOW_NS: Final = 1_000_000_000
DEFAULT_MEMORY_NS: Final = 60_000_000_000
DEFAULT_SPREAD: Final = 0.5


class _Published:
    """The last published claim for one address: who claimed it, when, how many copies came since, and from
    when an identical claim is published again."""

    __slots__ = ("captured_at", "due", "eth_src", "folded", "sender_mac")

    def __init__(self, claim: Claim, window: int) -> None:
        self.sender_mac = claim.sender_mac
        self.eth_src = claim.eth_src
        self.captured_at = claim.captured_at
        self.due = claim.captured_at + window
        self.folded = 0


class Coalescer:
    __slots__ = ("_last", "_next_sweep_ns", "_spread", "coalesced", "max_addresses", "memory_ns", "window_ns")

    def __init__(
        self,
        window_ns: int = DEFAULT_WINDOW_NS,
        *,
        max_addresses: int = 1_000_000,
        memory_ns: int = DEFAULT_MEMORY_NS,
        spread: float = DEFAULT_SPREAD,
    ) -> None:
        if window_ns < 0:
            raise ValueError("window_ns must not be negative")
        if not 0 <= spread <= 1:
            raise ValueError("spread must be between 0 and 1")
        self._spread = int(window_ns * spread)
        self.window_ns = window_ns
        self.memory_ns = max(memory_ns, window_ns)
        self.max_addresses = max_addresses
        self._last: dict[tuple[int | None, int], _Published] = {}  # by (vlan, address)
        self._next_sweep_ns = 0
        self.coalesced = 0  # frames counted, not published (read by the metrics collector)

    def __len__(self) -> int:
        return len(self._last)

    def admit(self, claims: list[Claim]) -> list[Claim]:
        """The claims to publish, in order; each carries the number of frames it stands for in `repeats`."""
        if self.window_ns == 0:
            return claims
        last = self._last
        window = self.window_ns
        out: list[Claim] = []
        for claim in claims:
            key = (claim.vlan, claim.sender_ip)
            entry = last.get(key)
            if entry is not None and entry.sender_mac == claim.sender_mac and entry.eth_src == claim.eth_src:
                # Identical to the last published claim for this address; a capture time earlier than it (frames
                # from several queues) counts as within the window.
                if claim.captured_at < entry.due:
                    entry.folded += 1
                    self.coalesced += 1
                    continue
                out.append(claim._replace(repeats=claim.repeats + entry.folded, renewal=True))
            else:
                out.append(claim)
            # The address's own window: a multiplicative hash (Knuth) of the address picks the lengthening.
            lengthening = self._spread * ((claim.sender_ip * 2654435761) & 0xFFFF) >> 16
            last[key] = _Published(claim, window + lengthening)
        if claims:
            self._maybe_sweep(claims[-1].captured_at)
        return out

    def _maybe_sweep(self, now_ns: int) -> None:
        if now_ns < self._next_sweep_ns and len(self._last) <= self.max_addresses:
            return
        self._next_sweep_ns = now_ns + self.window_ns
        cutoff = now_ns - self.memory_ns
        self._last = {k: v for k, v in self._last.items() if v.captured_at > cutoff}
        if len(self._last) > self.max_addresses:
            self._last.clear()
