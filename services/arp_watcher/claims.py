"""The claim rule (SPEC §4): which ARP frames assert "this MAC has this address". Pure: no I/O.

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

from .frames import ARP_REPLY, ARP_REQUEST, ArpFrame


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
