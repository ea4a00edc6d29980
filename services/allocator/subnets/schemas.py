"""Request and response models of /v1/subnets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import asyncpg
from pydantic import Field

from services.allocator.domain import addressing
from services.allocator.schemas import Cidr, Name, RequestModel, ResponseModel, Timestamp
from shared.events import DEFAULT_SEGMENT, SegmentName, SubnetData, Vlan


class SubnetCreate(RequestModel):
    vpc_id: uuid.UUID
    name: Name
    cidr: Cidr
    segment: SegmentName = Field(
        default=DEFAULT_SEGMENT,
        description="the layer-2 segment the subnet is on (a watcher's HAVIP_SEGMENT): claims seen elsewhere "
        "are never decided against its HAVIPs. One segment needs no configuration.",
    )
    vlan: Vlan | None = Field(
        default=None, description="its VLAN, where segments share a trunk; none: the whole segment"
    )


class Subnet(ResponseModel):
    id: uuid.UUID
    vpc_id: uuid.UUID
    name: str
    cidr: IPv4Network
    segment: str
    vlan: int | None
    gateway: IPv4Address = Field(description="first host address; reserved, like the network and broadcast")
    usable_addresses: int = Field(description="addresses that can be handed out at all (block size minus 3)")
    free_addresses: int = Field(description="usable addresses not taken by an instance or a HAVIP")
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: asyncpg.Record, used: int) -> Subnet:
        cidr: IPv4Network = row["cidr"]
        usable = addressing.usable_count(cidr)
        return cls(
            id=row["id"],
            vpc_id=row["vpc_id"],
            name=row["name"],
            cidr=cidr,
            segment=row["segment"],
            vlan=row["vlan"],
            gateway=addressing.gateway(cidr),
            usable_addresses=usable,
            free_addresses=max(usable - used, 0),
            created_at=row["created_at"],
        )

    def event_data(self) -> SubnetData:
        return SubnetData(
            id=self.id,
            vpc_id=self.vpc_id,
            name=self.name,
            cidr=str(self.cidr),
            segment=self.segment,
            vlan=self.vlan,
        )


@dataclass(frozen=True, slots=True)
class SubnetRef:
    """What allocation needs to know of a subnet."""

    id: uuid.UUID
    vpc_id: uuid.UUID
    cidr: IPv4Network
