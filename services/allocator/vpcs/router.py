"""HTTP routes of /v1/vpcs."""

from __future__ import annotations

import uuid

from fastapi import Response, status

from services.allocator.auth import api_router
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, Limit, PageToken
from services.allocator.schemas import Page
from services.allocator.vpcs import service
from services.allocator.vpcs.schemas import Vpc, VpcCreate

router = api_router("/v1/vpcs", "vpcs")


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a VPC")
async def create_vpc(body: VpcCreate, db: DbDep) -> Vpc:
    return await service.create_vpc(db, body)


@router.get("", summary="List VPCs")
async def list_vpcs(db: DbDep, limit: Limit = LIMIT_DEFAULT, page_token: PageToken = None) -> Page[Vpc]:
    return await service.list_vpcs(db, limit=limit, page_token=page_token)


@router.get("/{vpc_id}", summary="Show a VPC")
async def get_vpc(vpc_id: uuid.UUID, db: DbDep) -> Vpc:
    return await service.get_vpc(db, vpc_id)


@router.delete(
    "/{vpc_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a VPC (409 while it has subnets)"
)
async def delete_vpc(vpc_id: uuid.UUID, db: DbDep) -> Response:
    await service.delete_vpc(db, vpc_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
