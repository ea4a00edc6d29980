"""Request and response models of /v1/vpcs."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Network

import asyncpg

from services.allocator.schemas import Cidr, Name, RequestModel, ResponseModel, Timestamp
from shared.events import VpcData


class VpcCreate(RequestModel):
    name: Name
    cidr: Cidr


class Vpc(ResponseModel):
    id: uuid.UUID
    name: str
    cidr: IPv4Network
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Vpc:
        return cls(id=row["id"], name=row["name"], cidr=row["cidr"], created_at=row["created_at"])

    def event_data(self) -> VpcData:
        return VpcData(id=self.id, name=self.name, cidr=str(self.cidr))
