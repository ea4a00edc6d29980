"""Types and models shared by the resources' request and response schemas."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)

from services.allocator.domain import addressing, notation

T = TypeVar("T")

PAGE_LIMIT_DEFAULT = 100
PAGE_LIMIT_MAX = 1000


def rfc3339(value: datetime) -> str:
    """UTC, always with microseconds: 2025-01-31T12:00:00.000000Z."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "example": "2025-01-31T12:00:00.000000Z"}),
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(value: str) -> str:
    # Postgres refuses NUL, and a lone surrogate cannot be encoded as UTF-8: refuse both here (422), never 500.
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise ValueError("must be valid Unicode text")
    return value


# For the OpenAPI document: at least one non-space character, no control characters.
_NAME_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    AfterValidator(_printable),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 64, "pattern": _NAME_PATTERN}),
]

_MAC_FORMS = (
    re.compile(
        r"^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$"
    ),
    re.compile(r"^([0-9a-f]{2})([0-9a-f]{2})\.([0-9a-f]{2})([0-9a-f]{2})\.([0-9a-f]{2})([0-9a-f]{2})$"),
    re.compile(r"^([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$"),
)
# The accepted spellings, unicast only (low bit of the first octet clear), for the OpenAPI document.
_UNICAST = r"[0-9A-Fa-f][02468AaCcEe]"
MAC_PATTERN = (
    rf"^{_UNICAST}([:-][0-9A-Fa-f]{{2}}){{5}}$"
    rf"|^{_UNICAST}[0-9A-Fa-f]{{2}}(\.[0-9A-Fa-f]{{4}}){{2}}$"
    rf"|^{_UNICAST}[0-9A-Fa-f]{{10}}$"
)


def normalise_mac(value: object) -> str:
    """aa:bb:cc:dd:ee:ff from the usual spellings (colons, dashes, Cisco dots, bare hex); unicast only."""
    if not isinstance(value, str):
        raise ValueError("a MAC address must be a string")
    text = value.strip().lower()
    for form in _MAC_FORMS:
        match = form.match(text)
        if match:
            mac = ":".join(match.groups())
            break
    else:
        raise ValueError("not a MAC address (expected e.g. 02:00:c0:00:02:0a)")
    if int(mac[:2], 16) & 1:
        raise ValueError("a multicast MAC address cannot belong to an interface")
    if mac == "00:00:00:00:00:00":
        raise ValueError("the all-zero MAC address cannot belong to an interface")
    return mac


MacAddress = Annotated[
    str,
    BeforeValidator(normalise_mac),
    WithJsonSchema({"type": "string", "pattern": MAC_PATTERN, "example": "02:00:c0:00:02:0a"}),
]


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
# The shape of a CIDR block, in the OpenAPI document; notation.read_block enforces it (saying what is wrong),
# addressing.check_block the rest (/8 to /29, a unicast range).
CIDR_PATTERN = rf"^{_OCTET}(\.{_OCTET}){{3}}/(3[0-2]|[12]?[0-9])$"

Cidr = Annotated[
    IPv4Network,
    BeforeValidator(notation.read_block),
    AfterValidator(addressing.check_block),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "format": "ipv4-cidr",
            "pattern": CIDR_PATTERN,
            "example": "10.0.0.0/16",
            "description": "IPv4 block, host bits zero, /8 to /29, not in 0/8, 127/8, 169.254/16, 224/4, 240/4",
        }
    ),
]


# An IPv4 address in a request: dotted-quad text only (no integers, no leading zeros), refused with what is wrong.
RequestAddress = Annotated[
    IPv4Address,
    BeforeValidator(notation.read_address),
    WithJsonSchema({"type": "string", "format": "ipv4", "example": "10.0.0.5"}),
]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(frozen=True)


class Page(ResponseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = Field(
        default=None, description="pass as page_token to get the next page; null on the last page"
    )


class ErrorDetail(BaseModel):
    code: str = Field(examples=["NOT_FOUND"])
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("bad input"),
    401: _error("missing or wrong bearer token"),
    403: _error("quota exceeded"),
    404: _error("unknown id"),
    409: _error("conflict with the current state"),
    413: _error("request body too large"),
    422: _error("request does not match the schema"),
    503: _error("the database is unreachable; retry later"),
}
