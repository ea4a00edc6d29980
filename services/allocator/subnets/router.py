"""HTTP routes of /v1/subnets."""

from __future__ import annotations

import uuid

from fastapi import Response, status

from services.allocator.auth import api_router
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, Limit, PageToken
from services.allocator.schemas import Page
from services.allocator.subnets import service
from services.allocator.subnets.schemas import Subnet, SubnetCreate

router = api_router("/v1/subnets", "subnets")


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a subnet inside a VPC")
async def create_subnet(body: SubnetCreate, db: DbDep) -> Subnet:
    return await service.create_subnet(db, body)


@router.get("", summary="List subnets")
async def list_subnets(
    db: DbDep, vpc_id: uuid.UUID | None = None, limit: Limit = LIMIT_DEFAULT, page_token: PageToken = None
) -> Page[Subnet]:
    return await service.list_subnets(db, vpc_id=vpc_id, limit=limit, page_token=page_token)


@router.get("/{subnet_id}", summary="Show a subnet with its free-address count")
async def get_subnet(subnet_id: uuid.UUID, db: DbDep) -> Subnet:
    return await service.get_subnet(db, subnet_id)


@router.delete(
    "/{subnet_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a subnet (409 while instances or HAVIPs use it)",
)
async def delete_subnet(subnet_id: uuid.UUID, db: DbDep) -> Response:
    await service.delete_subnet(db, subnet_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
