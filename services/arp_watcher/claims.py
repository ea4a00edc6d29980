"""The claim rule (SPEC §4): which ARP frames assert "this MAC has this address". Pure: no I/O.

* ARP request with sender IP == target IP, not 0.0.0.0 → a gratuitous ARP announcement (`garp_request`), as
  keepalived sends;
* ARP reply whose sender IP is set → `arp_reply` (a gratuitous reply, or an answer to someone's request);
* probes (sender IP 0.0.0.0, RFC 5227), ordinary requests and any other opcode → not a claim.

The Ethernet source is reported as seen, even when it differs from the ARP sender MAC: the binding service
refuses such a claim as `eth_mismatch`, which it can only do if the watcher reports it.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import NamedTuple

from shared.events import ClaimKind, ClaimObserved

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


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


def to_event(claim: Claim, *, watcher_id: str, interface: str) -> ClaimObserved:
    """The `arp.claim.observed` event data for a claim."""
    return ClaimObserved(
        watcher_id=watcher_id,
        interface=interface,
        vlan=claim.vlan,
        kind=claim.kind,
        sender_mac=format_mac(claim.sender_mac),
        eth_src=format_mac(claim.eth_src),
        sender_ip=IPv4Address(claim.sender_ip),
        target_ip=IPv4Address(claim.target_ip),
        captured_at=claim.captured_at,
    )


def observe(frame: ArpFrame, *, captured_at: int, watcher_id: str, interface: str) -> ClaimObserved | None:
    """Classify a parsed frame and, when it is a claim, describe it as a ClaimObserved event."""
    claim = claim_from_frame(frame, captured_at)
    if claim is None:
        return None
    return to_event(claim, watcher_id=watcher_id, interface=interface)
