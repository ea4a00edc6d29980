"""Domain errors of the allocator. Plain Python: no HTTP here.

Each error carries a stable UPPER_SNAKE `code` that clients can rely on; the class says which kind of failure
it is. `exception_handlers.py` is the one place that turns these kinds into HTTP statuses.
"""

from __future__ import annotations

from typing import ClassVar


class DomainError(Exception):
    code: ClassVar[str] = "ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = code or self.code


class Invalid(DomainError):
    """The request can never succeed as written (HTTP 400)."""

    code = "INVALID_REQUEST"


class Unauthenticated(DomainError):
    """No or wrong credentials (HTTP 401)."""

    code = "UNAUTHENTICATED"


class QuotaExceeded(DomainError):
    """A configured limit would be exceeded (HTTP 403)."""

    code = "QUOTA_EXCEEDED"


class NotFound(DomainError):
    """An id that does not exist (HTTP 404)."""

    code = "NOT_FOUND"

    @classmethod
    def of(cls, kind: str, ident: object) -> NotFound:
        return cls(f"{kind} {ident} not found")


class Conflict(DomainError):
    """The request clashes with the current state (HTTP 409)."""

    code = "CONFLICT"


# Every call that would end a live binding is refused unless forced (HAVIP_BOUND, INSTANCE_HOLDS_HAVIP,
# HOLDER_NOT_IN_CANDIDATES); the message says how, in the API's and the CLI's words.
FORCE_HINT = "repeat with force=true (havipctl: --force) to do it anyway"


# ---- specific kinds used by the addressing rules ---------------------------------------------------------


class AddressNotInSubnet(Invalid):
    code = "ADDRESS_NOT_IN_SUBNET"


class AddressReserved(Invalid):
    code = "ADDRESS_RESERVED"


class AddressInUse(Conflict):
    code = "ADDRESS_IN_USE"


class SubnetFull(Conflict):
    code = "SUBNET_FULL"


class SubnetNotInVpc(Invalid):
    code = "SUBNET_NOT_IN_VPC"


class SubnetOverlap(Conflict):
    code = "SUBNET_OVERLAP"


class InvalidPageToken(Invalid):
    code = "INVALID_PAGE_TOKEN"
