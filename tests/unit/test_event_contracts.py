"""Published event contracts (docs/events/) match the pydantic models; real events validate against them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from shared import contracts
from shared.events import (
    EVENT_TYPES,
    BindingChanged,
    ClaimRejected,
    ClaimsObserved,
    EventData,
    HavipCondition,
    Holder,
    ObservedClaim,
    encode,
    envelope,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
HAVIP = uuid.uuid4()
MAC_A = "02:00:c0:00:02:0a"
MAC_B = "02:00:c0:00:02:0b"


def schema_validator(event_type: str) -> jsonschema_rs.Validator:
    schema = json.loads((ROOT / contracts.schema_path(event_type)).read_text(encoding="utf-8"))
    return jsonschema_rs.validator_for(schema, validate_formats=True)


def published_body(event_type: str, data: EventData) -> dict[str, Any]:
    """The JSON a consumer receives, exactly as the services encode it."""
    body: dict[str, Any] = json.loads(encode(envelope(event_type, data, source="test")))
    return body


def binding_changed(sequence: int = 7) -> BindingChanged:
    return BindingChanged(
        havip_id=HAVIP,
        address=IPv4Address("192.0.2.10"),
        previous=Holder(instance_id=uuid.uuid4(), mac=MAC_A),
        current=Holder(instance_id=uuid.uuid4(), mac=MAC_B),
        captured_at=NOW,
        committed_at=NOW,
        watcher_id="watcher-1",
        sequence=sequence,
        reason="claim",
    )


REAL_EVENTS: list[tuple[str, EventData]] = [
    ("havip.binding.changed", binding_changed()),
    (
        "havip.binding.changed",
        BindingChanged(
            havip_id=HAVIP,
            address=IPv4Address("192.0.2.10"),
            previous=Holder(instance_id=uuid.uuid4(), mac=MAC_B),
            current=None,
            captured_at=None,
            committed_at=NOW,
            watcher_id=None,
            sequence=8,
            reason="release",
        ),
    ),
    (
        "arp.claims.observed",
        ClaimsObserved(
            watcher_id="watcher-1",
            interface="eth0",
            claims=[
                ObservedClaim(
                    claim_id=uuid.uuid4(),
                    vlan=100,
                    kind="garp_request",
                    sender_mac=MAC_A,
                    eth_src=MAC_A,
                    sender_ip=IPv4Address("192.0.2.10"),
                    target_ip=IPv4Address("192.0.2.10"),
                    captured_at=1_796_000_000_000_000_000,
                    repeats=5,
                )
            ],
        ),
    ),
    (
        "havip.claim.rejected",
        ClaimRejected(
            address=IPv4Address("192.0.2.10"),
            havip_id=None,
            mac=MAC_B,
            reason="unknown_mac",
            captured_at=NOW,
            watcher_id="watcher-1",
            count=3,
        ),
    ),
    (
        "havip.split_brain.started",
        HavipCondition(
            havip_id=HAVIP, address=IPv4Address("192.0.2.10"), transitions_in_window=9, claimants_in_window=2
        ),
    ),
]


def test_checked_in_contracts_match_the_models() -> None:
    assert contracts.drifted(ROOT) == [], "regenerate with: python -m shared.contracts"


def test_every_event_type_has_a_schema_and_an_asyncapi_channel() -> None:
    document = yaml.safe_load((ROOT / contracts.ASYNCAPI_FILE).read_text(encoding="utf-8"))
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == set(EVENT_TYPES)
    for channel in document["channels"].values():
        exchange = channel["bindings"]["amqp"]["exchange"]
        assert exchange == {**exchange, "name": "havip.events", "type": "topic", "durable": True}
    for operation in document["operations"].values():
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2  # persistent
    for message in document["components"]["messages"].values():
        # Payload references are relative to the AsyncAPI document and must name a checked-in schema.
        assert (ROOT / contracts.EVENTS_DIR / message["payload"]["$ref"]).is_file()
    assert "havip.dlx" in document["info"]["description"]
    assert "havip.dead" in document["info"]["description"]


@pytest.mark.parametrize(("event_type", "data"), REAL_EVENTS, ids=[t for t, _ in REAL_EVENTS])
def test_real_events_validate_against_the_published_schema(event_type: str, data: EventData) -> None:
    body = published_body(event_type, data)
    errors = [error.message for error in schema_validator(event_type).iter_errors(body)]
    assert errors == []


@pytest.mark.parametrize(
    ("what", "spoil"),
    [
        ("sequence below 1", lambda body: body["data"].update(sequence=0)),
        ("an unknown field in data", lambda body: body["data"].update(extra=1)),
        ("a missing holder field", lambda body: body["data"]["current"].pop("mac")),
        ("an upper-case MAC", lambda body: body["data"]["current"].update(mac=MAC_B.upper())),
        ("another event's type", lambda body: body.update(type="havip.claim.rejected")),
        ("another schema version", lambda body: body.update(schema_version=2)),
        ("a malformed address", lambda body: body["data"].update(address="192.0.2.300")),
    ],
)
def test_the_published_schema_refuses_what_the_models_refuse(what: str, spoil: Any) -> None:
    body = published_body("havip.binding.changed", binding_changed())
    validator = schema_validator("havip.binding.changed")
    assert validator.is_valid(body)
    spoil(body)
    assert not validator.is_valid(body), what


def test_check_lists_drifted_and_stale_files_and_write_repairs_them(tmp_path: Path) -> None:
    shutil.copytree(ROOT / contracts.EVENTS_DIR, tmp_path / contracts.EVENTS_DIR)
    changed = contracts.schema_path("havip.binding.changed")
    (tmp_path / changed).write_text("{}\n", encoding="utf-8")
    stale = contracts.SCHEMAS_DIR / "havip.gone.json"
    (tmp_path / stale).write_text("{}\n", encoding="utf-8")

    check = subprocess.run(
        [sys.executable, "-m", "shared.contracts", "--check", "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1
    assert str(changed) in check.stderr
    assert str(stale) in check.stderr

    assert contracts.main(["--root", str(tmp_path)]) == 0
    assert contracts.drifted(tmp_path) == []
    assert not (tmp_path / stale).exists()
    assert contracts.main(["--check", "--root", str(tmp_path)]) == 0
