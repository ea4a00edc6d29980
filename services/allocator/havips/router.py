"""HTTP routes of /v1/havips."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import Annotated

from fastapi import Header, Query, Response, status

from services.allocator.auth import api_router
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, Limit, PageToken, SettingsDep
from services.allocator.havips import service
from services.allocator.havips.schemas import Havip, HavipCreate, HavipState, Transition
from services.allocator.schemas import Page

router = api_router("/v1/havips", "havips")

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=64,
        pattern=r"^[\x20-\x7e]+$",
        description=(
            "up to 64 printable ASCII characters; a retry with the same key and body returns the same HAVIP"
        ),
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Allocate a HAVIP: the given address, or the lowest free one of the subnet",
)
async def allocate_havip(
    body: HavipCreate,
    db: DbDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Havip:
    havip, replayed = await service.allocate_havip(
        db, body, quota=settings.havip_quota_per_vpc, idempotency_key=idempotency_key
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return havip


@router.get("", summary="List HAVIPs")
async def list_havips(
    db: DbDep,
    vpc_id: uuid.UUID | None = None,
    subnet_id: uuid.UUID | None = None,
    state: HavipState | None = None,
    address: IPv4Address | None = None,
    limit: Limit = LIMIT_DEFAULT,
    page_token: PageToken = None,
) -> Page[Havip]:
    return await service.list_havips(
        db,
        vpc_id=vpc_id,
        subnet_id=subnet_id,
        state=state,
        address=address,
        limit=limit,
        page_token=page_token,
    )


@router.get("/{havip_id}", summary="Show a HAVIP with its binding")
async def get_havip(havip_id: uuid.UUID, db: DbDep) -> Havip:
    return await service.get_havip(db, havip_id)


@router.delete(
    "/{havip_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Release a HAVIP (409 while an EIP is associated, or while bound unless force=true)",
)
async def release_havip(
    havip_id: uuid.UUID,
    db: DbDep,
    force: Annotated[bool, Query(description="release even while an instance holds it")] = False,
) -> Response:
    await service.release_havip(db, havip_id, force=force)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{havip_id}/transitions", summary="Ownership history of a HAVIP, newest first")
async def list_transitions(
    havip_id: uuid.UUID, db: DbDep, limit: Limit = LIMIT_DEFAULT, page_token: PageToken = None
) -> Page[Transition]:
    return await service.list_transitions(db, havip_id, limit=limit, page_token=page_token)
