"""HTTP routes of /v1/claims."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Query

from services.allocator.auth import api_router
from services.allocator.claims import service
from services.allocator.claims.schemas import RejectedClaim
from services.allocator.dependencies import LIMIT_DEFAULT, DbDep, Limit, PageToken
from services.allocator.schemas import Page

router = api_router("/v1/claims", "claims")


@router.get(
    "/rejected",
    summary="Audit of refused claims, newest first",
    description=(
        "Every ARP claim the binding service refused: unknown MAC, an instance of another "
        "subnet, not a candidate, or Ethernet/ARP MAC mismatch. Kept after the HAVIP is released. From the "
        "binding service's `havip.claim.rejected` events, kept by the allocator: eventually consistent, a few "
        "milliseconds behind the binding's commit."
    ),
)
async def list_rejected_claims(
    db: DbDep,
    havip_id: Annotated[uuid.UUID | None, Query(description="only the claims on this HAVIP")] = None,
    limit: Limit = LIMIT_DEFAULT,
    page_token: PageToken = None,
) -> Page[RejectedClaim]:
    return await service.list_rejected_claims(db, havip_id=havip_id, limit=limit, page_token=page_token)
