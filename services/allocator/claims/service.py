"""The audit of refused claims, from the allocator's view of the binding service's events
(`havip.claim.rejected`, binding_view/): eventually consistent, within milliseconds.

Newest first (by the record's id, which grows with every refusal the view takes in); the page token carries the
id of the last record returned.
"""

from __future__ import annotations

import uuid

from services.allocator.claims.schemas import RejectedClaim
from services.allocator.database import Database
from services.allocator.pagination import decode_record, encode_record
from services.allocator.schemas import Page


async def list_rejected_claims(
    db: Database, *, havip_id: uuid.UUID | None, limit: int, page_token: str | None
) -> Page[RejectedClaim]:
    before = decode_record(page_token) if page_token is not None else None
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT id, havip_id, host(address) AS address, mac, reason, captured_at, watcher_id, count
               FROM allocator.view_refusals
               WHERE ($1::uuid IS NULL OR havip_id = $1) AND ($2::bigint IS NULL OR id < $2)
               ORDER BY id DESC LIMIT $3""",
            havip_id,
            before,
            limit + 1,
        )
    token = encode_record(rows[limit - 1]["id"]) if len(rows) > limit else None
    return Page[RejectedClaim](items=[RejectedClaim.from_row(r) for r in rows[:limit]], next_page_token=token)
