"""HTTP routes of /v1/havips."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Body, Header, Query, Response, status

from services.allocator.auth import api_router
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, EipPoolDep, Limit, PageToken, SettingsDep
from services.allocator.havips import service
from services.allocator.havips.schemas import EipAssociate, Havip, HavipCreate, HavipState, HavipUpdate, Transition
from services.allocator.schemas import Page, RequestAddress

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
    responses={
        201: {
            "description": "the HAVIP allocated (or, for a retried Idempotency-Key, the one allocated before)",
            "headers": {
                "Idempotent-Replayed": {
                    "description": "`true` when this answer repeats an earlier request with the same key",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        }
    },
)
async def allocate_havip(
    body: HavipCreate,
    db: DbDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Havip:
    havip, replayed = await service.allocate_havip(
        db,
        body,
        quota=settings.havip_quota_per_vpc,
        idempotency_key=idempotency_key,
        idempotency_ttl_hours=settings.idempotency_ttl_hours,
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return havip


VIEW_NOTE = (
    "The binding fields (`state`, `bound_instance_id`, `bound_mac`, `last_transition_at`, `last_seen_at`, "
    "`flapping`, `split_brain`) are the allocator's view of the binding service's events: eventually "
    "consistent, milliseconds behind the binding's commit (see the API description and the metric "
    "`havip_view_delay_seconds`)."
)


@router.get("", summary="List HAVIPs", description=VIEW_NOTE)
async def list_havips(
    db: DbDep,
    vpc_id: uuid.UUID | None = None,
    subnet_id: uuid.UUID | None = None,
    state: HavipState | None = None,
    address: RequestAddress | None = None,
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


@router.get("/{havip_id}", summary="Show a HAVIP with its binding", description=VIEW_NOTE)
async def get_havip(havip_id: uuid.UUID, db: DbDep) -> Havip:
    return await service.get_havip(db, havip_id)


@router.patch(
    "/{havip_id}",
    summary="Rename a HAVIP and/or replace its candidate list",
    description=(
        "A merge patch: fields left out are kept; `name: null` removes the name; `candidates: []` clears the "
        "list. Publishes `havip.updated` when something changed. A candidate list that leaves out the holder "
        "would end the binding: 409 `HOLDER_NOT_IN_CANDIDATES` unless force=true (then the binding service "
        "ends it with a `release` transition, cause `candidates_changed`)."
    ),
)
async def update_havip(
    havip_id: uuid.UUID,
    body: HavipUpdate,
    db: DbDep,
    force: Annotated[bool, Query(description="replace the candidates even if that ends the binding")] = False,
) -> Havip:
    return await service.update_havip(db, havip_id, body, force=force)


@router.post(
    "/{havip_id}/eip",
    summary="Associate an EIP from the configured public pool: the given one, or the lowest free one",
    description="One EIP per HAVIP (409 `EIP_ASSOCIATED`), one HAVIP per EIP (409 `EIP_IN_USE`).",
)
async def associate_eip(
    havip_id: uuid.UUID,
    db: DbDep,
    pool: EipPoolDep,
    body: Annotated[EipAssociate | None, Body()] = None,
) -> Havip:
    return await service.associate_eip(db, havip_id, body or EipAssociate(), pool)


@router.delete(
    "/{havip_id}/eip",
    summary="Dissociate the HAVIP's EIP (409 `EIP_NOT_ASSOCIATED` when it has none)",
)
async def dissociate_eip(havip_id: uuid.UUID, db: DbDep) -> Havip:
    return await service.dissociate_eip(db, havip_id)


@router.delete(
    "/{havip_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Release a HAVIP (409 while an EIP is associated, or while bound unless force=true)",
    description=(
        "Bound or not (409 `HAVIP_BOUND`) is decided on the allocator's view of the binding service's events, "
        "which may be milliseconds behind it; a HAVIP released while an instance has just claimed it is "
        "then unbound by the binding service, with a final `release` transition (cause `released`)."
    ),
)
async def release_havip(
    havip_id: uuid.UUID,
    db: DbDep,
    force: Annotated[bool, Query(description="release even while an instance holds it")] = False,
) -> Response:
    await service.release_havip(db, havip_id, force=force)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{havip_id}/transitions",
    summary="Ownership history of a HAVIP, newest first",
    description=(
        "From the binding service's `havip.binding.changed` events, kept by the allocator: eventually "
        "consistent, milliseconds behind the binding's commit. Kept after the HAVIP is released."
    ),
)
async def list_transitions(
    havip_id: uuid.UUID, db: DbDep, limit: Limit = LIMIT_DEFAULT, page_token: PageToken = None
) -> Page[Transition]:
    return await service.list_transitions(db, havip_id, limit=limit, page_token=page_token)
