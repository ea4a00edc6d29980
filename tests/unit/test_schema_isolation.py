"""No service names another service's database schema: each reads and writes only its own tables, and learns
the rest from events (the database roles enforce it at run time: tests/integration/test_database_roles.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = {"allocator": "allocator", "binding": "binding"}  # service package -> its schema
SERVICES = ("allocator", "binding", "arp_watcher")


def sources(service: str) -> list[Path]:
    return sorted(p for p in (ROOT / "services" / service).rglob("*") if p.suffix in (".py", ".sql"))


@pytest.mark.parametrize("service", SERVICES)
def test_no_sql_of_a_service_names_another_services_schema(service: str) -> None:
    others = [schema for owner, schema in SCHEMAS.items() if owner != service]
    # `schema.table` as SQL writes it; a dotted Python or routing-key name (havip.binding.changed,
    # services.binding.x) has a dot or a letter before it and is not a schema reference.
    pattern = re.compile(rf"(?<![\w.])({'|'.join(others)})\.[a-z_]+")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources(service)
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert sources(service), f"no sources found for {service}"
    assert found == []


def test_the_check_would_see_a_reference() -> None:
    pattern = re.compile(r"(?<![\w.])(binding)\.[a-z_]+")
    assert pattern.search("LEFT JOIN binding.bindings b ON b.havip_id = h.id")
    assert pattern.search('"SELECT 1 FROM binding.transitions"')
    assert not pattern.search('"havip.binding.changed"')
    assert not pattern.search("from services.binding.domain import Claim")
