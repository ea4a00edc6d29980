"""Request and response models of /v1/instances."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address

import asyncpg

from services.allocator.schemas import MacAddress, Name, RequestAddress, RequestModel, ResponseModel, Timestamp
from shared.events import InstanceData


class InstanceCreate(RequestModel):
    subnet_id: uuid.UUID
    name: Name
    private_ip: RequestAddress
    mac: MacAddress


class Instance(ResponseModel):
    id: uuid.UUID
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    name: str
    private_ip: IPv4Address
    mac: str
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Instance:
        return cls(
            id=row["id"],
            vpc_id=row["vpc_id"],
            subnet_id=row["subnet_id"],
            name=row["name"],
            private_ip=row["private_ip"],
            mac=row["mac"],
            created_at=row["created_at"],
        )

    def event_data(self) -> InstanceData:
        return InstanceData(
            id=self.id,
            vpc_id=self.vpc_id,
            subnet_id=self.subnet_id,
            name=self.name,
            private_ip=self.private_ip,
            mac=self.mac,
        )
