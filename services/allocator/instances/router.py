"""HTTP routes of /v1/instances."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Query, Response, status

from services.allocator.auth import api_router
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, Limit, PageToken
from services.allocator.instances import service
from services.allocator.instances.schemas import Instance, InstanceCreate
from services.allocator.schemas import Page

router = api_router("/v1/instances", "instances")


@router.post("", status_code=status.HTTP_201_CREATED, summary="Register a server's network interface")
async def register_instance(body: InstanceCreate, db: DbDep) -> Instance:
    return await service.register_instance(db, body)


@router.get("", summary="List instances")
async def list_instances(
    db: DbDep,
    vpc_id: uuid.UUID | None = None,
    subnet_id: uuid.UUID | None = None,
    limit: Limit = LIMIT_DEFAULT,
    page_token: PageToken = None,
) -> Page[Instance]:
    return await service.list_instances(db, vpc_id=vpc_id, subnet_id=subnet_id, limit=limit, page_token=page_token)


@router.get("/{instance_id}", summary="Show an instance")
async def get_instance(instance_id: uuid.UUID, db: DbDep) -> Instance:
    return await service.get_instance(db, instance_id)


@router.delete(
    "/{instance_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Deregister an instance (409 while it holds a HAVIP or is a HAVIP candidate, unless force=true)",
    description=(
        "While the allocator's view shows the instance holding a HAVIP: 409 `INSTANCE_HOLDS_HAVIP` (forced, the "
        "binding service ends each such binding with a `release` transition, cause `instance_deregistered`). "
        "While it is a candidate of a HAVIP: 409 `INSTANCE_IN_USE` (forced, the candidate lists keep its id, "
        "which then authorises nobody: a list never widens to any instance by itself). Holding is decided on "
        "the view of the binding service's events, which may be milliseconds behind it."
    ),
)
async def deregister_instance(
    instance_id: uuid.UUID,
    db: DbDep,
    force: Annotated[
        bool, Query(description="deregister even while it holds a HAVIP or is a HAVIP candidate")
    ] = False,
) -> Response:
    await service.deregister_instance(db, instance_id, force=force)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
