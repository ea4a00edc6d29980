"""Database role names: each service's default, and bad names refused before they reach SQL text."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.migrations import MigrationError, check_identifier, service_role
from shared.settings import CommonSettings


def test_each_service_has_a_role_of_its_own_by_default() -> None:
    assert service_role("allocator") == "havip_allocator"
    assert service_role("binding") == "havip_binding"
    assert CommonSettings().database_role is None  # the service's own, then


@pytest.mark.parametrize(
    "name", ["", "Havip", "havip-allocator", "havip allocator", 'x"; DROP ROLE y; --', "a" * 64]
)
def test_a_bad_role_name_is_refused_with_a_clear_error(name: str) -> None:
    with pytest.raises(ValidationError, match="database_role"):
        CommonSettings(database_role=name)
    with pytest.raises(MigrationError, match="invalid role name"):
        check_identifier("role", name)


def test_a_good_role_name_is_accepted() -> None:
    assert CommonSettings(database_role="tenant_7_allocator").database_role == "tenant_7_allocator"
    assert check_identifier("role", "tenant_7_allocator") == "tenant_7_allocator"
