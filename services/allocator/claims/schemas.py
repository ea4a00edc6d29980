"""Response model of /v1/claims/rejected."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv6Address, ip_address

import asyncpg
from pydantic import Field

from services.allocator.schemas import ResponseModel, Timestamp
from shared.events import RejectReason


class RejectedClaim(ResponseModel):
    havip_id: uuid.UUID | None = Field(description="the HAVIP whose address was claimed; null if none was known")
    address: IPv4Address | IPv6Address = Field(description="the address claimed")
    mac: str = Field(description="the MAC that claimed it")
    reason: RejectReason = Field(
        description=(
            "unknown_mac: not a registered instance; other_subnet: an instance of another subnet; "
            "not_candidate: not in the HAVIP's candidate list; eth_mismatch: Ethernet source differs from the "
            "ARP sender MAC; clock_skew: captured further ahead of the binding service's clock than allowed"
        )
    )
    captured_at: Timestamp = Field(description="kernel capture time of the frame")
    watcher_id: str = Field(description="the watcher that saw it")
    count: int = Field(
        ge=1,
        description="frames folded into this refusal: repeats of it (same address, MAC, reason) within a second",
    )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> RejectedClaim:
        return cls(
            havip_id=row["havip_id"],
            address=ip_address(row["address"]),
            mac=row["mac"],
            reason=row["reason"],
            captured_at=row["captured_at"],
            watcher_id=row["watcher_id"],
            count=row["count"],
        )
