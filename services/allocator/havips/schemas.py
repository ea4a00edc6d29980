"""Request and response models of /v1/havips."""

from __future__ import annotations

import hashlib
import json
import uuid
from ipaddress import IPv4Address
from typing import Annotated, Literal

import asyncpg
from pydantic import AfterValidator, Field

from services.allocator.schemas import Name, RequestAddress, RequestModel, ResponseModel, Timestamp
from shared.events import HavipData

MAX_CANDIDATES = 10

HavipState = Literal["UNBOUND", "BOUND"]


def _distinct(value: list[uuid.UUID]) -> list[uuid.UUID]:
    if len(set(value)) != len(value):
        raise ValueError("candidates must not repeat an instance")
    return value


Candidates = Annotated[
    list[uuid.UUID],
    Field(
        max_length=MAX_CANDIDATES,
        json_schema_extra={"uniqueItems": True},
        description=(
            f"at most {MAX_CANDIDATES} distinct instances of the HAVIP's subnet allowed to hold it; "
            "empty = any instance of the subnet"
        ),
    ),
    AfterValidator(_distinct),
]


class HavipCreate(RequestModel):
    subnet_id: uuid.UUID
    name: Name | None = None
    address: RequestAddress | None = Field(
        default=None, description="the address to take; omitted = the lowest free address of the subnet"
    )
    candidates: Candidates = Field(default_factory=list)

    def fingerprint(self) -> str:
        """Identifies the request body for Idempotency-Key: same key + same body = same HAVIP."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class HavipUpdate(RequestModel):
    """A merge patch: a field left out is kept; `"name": null` removes the name, `"candidates": []` clears
    the allow-list (any instance of the subnet may then hold the HAVIP)."""

    name: Name | None = Field(default=None, description="new name; null removes it")
    candidates: Candidates = Field(default_factory=list)

    @property
    def changes_name(self) -> bool:
        return "name" in self.model_fields_set

    @property
    def changes_candidates(self) -> bool:
        return "candidates" in self.model_fields_set


class EipAssociate(RequestModel):
    address: RequestAddress | None = Field(
        default=None, description="an address of the configured EIP pool; omitted = the lowest free one"
    )


class Havip(ResponseModel):
    id: uuid.UUID
    name: str | None
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    address: IPv4Address
    state: HavipState = Field(
        description="BOUND while an instance holds it, as the binding service's events tell (eventually)"
    )
    bound_instance_id: uuid.UUID | None
    bound_mac: str | None
    last_transition_at: Timestamp | None = Field(description="the binding service's commit of the last transition")
    last_seen_at: Timestamp | None = Field(
        description="kernel capture time of the claim that made the current (or last) holder"
    )
    candidates: list[uuid.UUID]
    eip: IPv4Address | None
    flapping: bool
    split_brain: bool
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Havip:
        """A row of allocator.havips LEFT JOIN allocator.view_bindings (no row, or no holder = UNBOUND)."""
        bound = row["bound_instance_id"] is not None
        return cls(
            id=row["id"],
            name=row["name"],
            vpc_id=row["vpc_id"],
            subnet_id=row["subnet_id"],
            address=row["address"],
            state="BOUND" if bound else "UNBOUND",
            bound_instance_id=row["bound_instance_id"],
            bound_mac=row["bound_mac"] if bound else None,
            last_transition_at=row["last_transition_at"],
            last_seen_at=row["last_seen_at"],
            candidates=list(row["candidates"]),
            eip=row["eip"],
            flapping=row["flapping"],
            split_brain=row["split_brain"],
            created_at=row["created_at"],
        )

    def event_data(self) -> HavipData:
        return HavipData(
            id=self.id,
            vpc_id=self.vpc_id,
            subnet_id=self.subnet_id,
            name=self.name,
            address=self.address,
            candidates=self.candidates,
            eip=self.eip,
        )


class Transition(ResponseModel):
    sequence: int = Field(description="per HAVIP, strictly increasing")
    from_instance_id: uuid.UUID | None
    to_instance_id: uuid.UUID | None
    mac: str | None
    captured_at: Timestamp | None
    committed_at: Timestamp
    watcher_id: str | None
    reason: Literal["claim", "release"]
    cause: Literal["released", "instance_deregistered", "candidates_changed"] | None = Field(
        description="for a release: the HAVIP released, its holder deregistered, or a candidate list that no "
        "longer names the holder; null for a claim (and for releases recorded before causes were kept)"
    )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Transition:
        return cls(
            sequence=row["sequence"],
            from_instance_id=row["from_instance_id"],
            to_instance_id=row["to_instance_id"],
            mac=row["mac"],
            captured_at=row["captured_at"],
            committed_at=row["committed_at"],
            watcher_id=row["watcher_id"],
            reason=row["reason"],
            cause=row["cause"],
        )
