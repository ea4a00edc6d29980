"""The claim rule (docs/contract.md#claims): which ARP frames assert "this MAC has this address". Pure: no I/O.

* ARP request with sender IP == target IP, not 0.0.0.0 → a gratuitous ARP announcement (`garp_request`), as
  keepalived sends;
* ARP reply whose sender IP is set → `arp_reply` (a gratuitous reply, or an answer to someone's request);
* probes (sender IP 0.0.0.0, RFC 5227), ordinary requests and any other opcode → not a claim.

The Ethernet source is reported as seen, even when it differs from the ARP sender MAC: the binding service
refuses such a claim as `eth_mismatch`, which it can only do if the watcher reports it.
"""

from __future__ import annotations

from typing import NamedTuple

from shared.events import ClaimKind

from .frames import ARP_REPLY, ARP_REQUEST, ArpFrame, parse_frame


class Claim(NamedTuple):
    """A claim as the capture thread keeps it: compact (raw addresses), until it is published."""

    kind: ClaimKind
    vlan: int | None
    sender_mac: bytes
    eth_src: bytes
    sender_ip: int
    target_ip: int
    captured_at: int  # kernel receive time, ns since the epoch
    repeats: int = 1  # this frame and the identical ones the coalescer folded in before it
    # The coalescer's view: the same claimant as the last published claim of its address (a holder's periodic
    # refresh), which only renews what the binding service knows; published in the routine lane.
    renewal: bool = False
    read_at: int = 0  # when the capture thread handed it over (ClaimBuffer.put_many), ns since the epoch


def classify(frame: ArpFrame) -> ClaimKind | None:
    """The kind of claim `frame` makes, or None when it makes none."""
    if frame.oper == ARP_REQUEST:
        if frame.sender_ip != 0 and frame.sender_ip == frame.target_ip:
            return "garp_request"
        return None
    if frame.oper == ARP_REPLY and frame.sender_ip != 0:
        return "arp_reply"
    return None


def claim_from_frame(frame: ArpFrame, captured_at: int) -> Claim | None:
    kind = classify(frame)
    if kind is None:
        return None
    return Claim(kind, frame.vlan, frame.sender_mac, frame.eth_src, frame.sender_ip, frame.target_ip, captured_at)


class ClaimMemo:
    """The claim each distinct frame makes, remembered. A spoofer's flood, keepalived's bursts and a holder's
    refreshes repeat identical frames; looking one up costs about a third of parsing it again (bench: 4.5 → 1.8
    µs a frame with the coalescer), and the capture thread must keep ahead of a flood so that a takeover behind
    it is not kept waiting in the ring.

    Only frames that parse are remembered (a malformed one raises as `parse_frame` does, every time). Memory is
    bounded: past `max_frames` distinct frames the memo is emptied, which only costs parsing again.
    """

    __slots__ = ("_known", "max_frames")

    def __init__(self, max_frames: int = 4096) -> None:
        self.max_frames = max_frames
        self._known: dict[tuple[int | None, bytes], Claim | None] = {}

    def __len__(self) -> int:
        return len(self._known)

    def claim(self, data: bytes, vlan: int | None, captured_at: int) -> Claim | None:
        """`claim_from_frame(parse_frame(data, vlan), captured_at)`; raises MalformedFrame or NotArp as it does."""
        key = (vlan, data)
        try:
            known = self._known[key]
        except KeyError:
            known = claim_from_frame(parse_frame(data, vlan), 0)
            if len(self._known) >= self.max_frames:
                self._known.clear()
            self._known[key] = known
        if known is None:
            return None
        return Claim(known[0], known[1], known[2], known[3], known[4], known[5], captured_at)
