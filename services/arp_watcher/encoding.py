"""The `arp.claims.observed` event, encoded on the hot path without per-claim pydantic validation (msgspec).

The pydantic models of shared/events.py stay the contract: what this writes validates against them
(tests/unit/test_arp_encoding.py proves it on generated claims).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from shared.events import CLAIMS_EVENT, DEFAULT_SEGMENT, SCHEMA_VERSION

from .claims import Claim

_ENCODER: Final = msgspec.json.Encoder()
_inet_ntoa = socket.inet_ntoa


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


def format_ipv4(address: int) -> str:
    return _inet_ntoa(address.to_bytes(4, "big"))


def claim_fields(claim: Claim) -> dict[str, Any]:
    """One claim as the event's `claims[]` item (a new claim_id each call)."""
    return {
        "claim_id": uuid.uuid4(),
        "vlan": claim.vlan,
        "kind": claim.kind,
        "sender_mac": claim.sender_mac.hex(":"),
        "eth_src": claim.eth_src.hex(":"),
        "sender_ip": _inet_ntoa(claim.sender_ip.to_bytes(4, "big")),
        "target_ip": _inet_ntoa(claim.target_ip.to_bytes(4, "big")),
        "captured_at": claim.captured_at,
        "repeats": claim.repeats,
    }


class EncodedEvent(msgspec.Struct, frozen=True):
    event_id: uuid.UUID
    occurred_at: datetime
    body: bytes
    claims: int


def encode_claims(
    claims: Sequence[Claim],
    *,
    watcher_id: str,
    interface: str,
    source: str,
    segment: str = DEFAULT_SEGMENT,
) -> EncodedEvent:
    """One envelope carrying `claims` (1 … MAX_CLAIMS_PER_EVENT), ready to publish."""
    event_id = uuid.uuid4()
    occurred_at = datetime.now(UTC)
    body = _ENCODER.encode(
        {
            "event_id": event_id,
            "type": CLAIMS_EVENT,
            "schema_version": SCHEMA_VERSION,
            "occurred_at": occurred_at,
            "source": source,
            "data": {
                "watcher_id": watcher_id,
                "interface": interface,
                "segment": segment,
                "claims": [claim_fields(claim) for claim in claims],
            },
        }
    )
    return EncodedEvent(event_id, occurred_at, body, len(claims))
