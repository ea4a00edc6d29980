"""Event envelope and the data model of every event type (SPEC §6).

The envelope is the same for all events; `data` is validated against the model registered for `type`.
The JSON Schemas published for consumers outside this project are generated from these models.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

SCHEMA_VERSION = 1

MacAddress = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", to_lower=True, strip_whitespace=True)
]


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- arp_watcher -------------------------------------------------------------------------------------------

ClaimKind = Literal["garp_request", "arp_reply"]


class ClaimObserved(EventData):
    """One ARP frame that asserts "sender_mac has sender_ip" (SPEC §4)."""

    watcher_id: str
    interface: str
    vlan: int | None = Field(default=None, ge=0, le=4095)
    kind: ClaimKind
    sender_mac: MacAddress
    eth_src: MacAddress
    sender_ip: IPv4Address
    target_ip: IPv4Address
    captured_at: int = Field(gt=0, description="kernel receive time, nanoseconds since the Unix epoch")


# ---- allocator ---------------------------------------------------------------------------------------------


class VpcData(EventData):
    id: uuid.UUID
    name: str
    cidr: str


class SubnetData(EventData):
    id: uuid.UUID
    vpc_id: uuid.UUID
    name: str
    cidr: str


class InstanceData(EventData):
    id: uuid.UUID
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    name: str
    private_ip: IPv4Address
    mac: MacAddress


class HavipData(EventData):
    id: uuid.UUID
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    name: str | None
    address: IPv4Address
    candidates: list[uuid.UUID]
    eip: IPv4Address | None = None


class EipData(EventData):
    havip_id: uuid.UUID
    eip: IPv4Address


# ---- binding -----------------------------------------------------------------------------------------------


class Holder(EventData):
    instance_id: uuid.UUID
    mac: MacAddress


class BindingChanged(EventData):
    havip_id: uuid.UUID
    address: IPv4Address
    previous: Holder | None
    current: Holder | None
    captured_at: datetime | None
    committed_at: datetime
    watcher_id: str | None
    sequence: int = Field(ge=1)
    reason: Literal["claim", "release"]


RejectReason = Literal["unknown_mac", "other_subnet", "not_candidate", "eth_mismatch"]


class ClaimRejected(EventData):
    address: IPv4Address
    havip_id: uuid.UUID | None
    mac: MacAddress
    reason: RejectReason
    captured_at: datetime
    watcher_id: str


class HavipCondition(EventData):
    """Edge of a flapping or split-brain condition."""

    havip_id: uuid.UUID
    address: IPv4Address
    transitions_in_window: int = Field(ge=0)
    claimants_in_window: int = Field(ge=0)


EVENT_TYPES: dict[str, type[EventData]] = {
    "arp.claim.observed": ClaimObserved,
    "vpc.created": VpcData,
    "vpc.deleted": VpcData,
    "subnet.created": SubnetData,
    "subnet.deleted": SubnetData,
    "instance.registered": InstanceData,
    "instance.deregistered": InstanceData,
    "havip.allocated": HavipData,
    "havip.updated": HavipData,
    "havip.released": HavipData,
    "havip.eip.associated": EipData,
    "havip.eip.dissociated": EipData,
    "havip.binding.changed": BindingChanged,
    "havip.claim.rejected": ClaimRejected,
    "havip.flapping.started": HavipCondition,
    "havip.flapping.stopped": HavipCondition,
    "havip.split_brain.started": HavipCondition,
    "havip.split_brain.stopped": HavipCondition,
}


class Envelope(BaseModel):
    """What travels on `havip.events`: the routing key equals `type`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID
    type: str
    schema_version: int
    occurred_at: datetime
    source: str
    data: dict[str, Any]


class InvalidEvent(ValueError):
    """A message that can never be processed: it goes to the dead-letter exchange."""


def envelope(event_type: str, data: EventData, source: str) -> Envelope:
    expected = EVENT_TYPES.get(event_type)
    if expected is None or not isinstance(data, expected):
        raise TypeError(f"{event_type!r} does not carry {type(data).__name__}")
    return Envelope(
        event_id=uuid.uuid4(),
        type=event_type,
        schema_version=SCHEMA_VERSION,
        occurred_at=datetime.now(UTC),
        source=source,
        data=data.model_dump(mode="json"),
    )


def decode(body: bytes) -> tuple[Envelope, EventData]:
    """Parse and validate a message body; raise InvalidEvent with a clear reason otherwise."""
    try:
        env = Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidEvent(f"not a valid event envelope: {exc.errors(include_url=False)}") from exc
    model = EVENT_TYPES.get(env.type)
    if model is None:
        raise InvalidEvent(f"unknown event type {env.type!r}")
    if env.schema_version != SCHEMA_VERSION:
        raise InvalidEvent(f"unsupported schema_version {env.schema_version} for {env.type!r}")
    try:
        return env, model.model_validate(env.data)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid data for {env.type!r}: {exc.errors(include_url=False)}") from exc


def encode(env: Envelope) -> bytes:
    return env.model_dump_json().encode()
