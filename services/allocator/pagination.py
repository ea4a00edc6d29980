"""Keyset pagination: opaque page tokens that carry the sort key of the last item returned.

Lists are ordered by (created_at, id); a page is "the next `limit` rows after this key", so pages stay
consistent while rows are added or removed and cost the same however deep the client goes. The two histories
(transitions, refused claims) go newest first by a strictly increasing number instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.allocator.errors import InvalidPageToken


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: datetime
    id: uuid.UUID


def _encode(payload: Any) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> Any:
    if len(token) > 256:
        raise InvalidPageToken("page_token is not one this API issued")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidPageToken("page_token is not one this API issued") from None


def encode_cursor(cursor: Cursor) -> str:
    return _encode({"t": cursor.created_at.isoformat(), "i": str(cursor.id)})


def decode_cursor(token: str) -> Cursor:
    payload = _decode(token)
    try:
        created_at = datetime.fromisoformat(payload["t"])
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        # in UTC, so that the database never has to convert a year-1 or year-9999 edge case
        return Cursor(created_at.astimezone(UTC), uuid.UUID(payload["i"]))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise InvalidPageToken("page_token is not one this API issued") from None


def _encode_position(key: str, position: int) -> str:
    return _encode({key: position})


def _decode_position(key: str, token: str) -> int:
    payload = _decode(token)
    try:
        position = payload[key]
    except (KeyError, TypeError, IndexError):
        raise InvalidPageToken("page_token is not one this API issued") from None
    if not isinstance(position, int) or isinstance(position, bool) or not 0 < position < 2**63:
        raise InvalidPageToken("page_token is not one this API issued")
    return position


def encode_sequence(sequence: int) -> str:
    """Transitions, newest first: the next page holds the sequences below this one."""
    return _encode_position("s", sequence)


def decode_sequence(token: str) -> int:
    return _decode_position("s", token)


def encode_record(record_id: int) -> str:
    """Refused claims, newest first: the next page holds the records below this one."""
    return _encode_position("r", record_id)


def decode_record(token: str) -> int:
    return _decode_position("r", token)


class Where:
    """Builds `WHERE a = $1 AND b = $2` with numbered parameters for asyncpg."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def add(self, template: str, *values: Any) -> None:
        """`template` holds `{}` for each value, e.g. add("s.vpc_id = {}", vpc_id)."""
        self.conditions.append(template.format(*(self.param(v) for v in values)))

    def after(self, created_at_column: str, id_column: str, token: str | None) -> None:
        if token is not None:
            cursor = decode_cursor(token)
            self.add(f"({created_at_column}, {id_column}) > ({{}}, {{}})", cursor.created_at, cursor.id)

    @property
    def sql(self) -> str:
        return f"WHERE {' AND '.join(self.conditions)}" if self.conditions else ""


def next_token(rows: list[asyncpg.Record], limit: int) -> tuple[list[asyncpg.Record], str | None]:
    """Rows were fetched with LIMIT limit + 1: trim, and give the token of the next page if there is one."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    return rows, encode_cursor(Cursor(last["created_at"], last["id"]))
