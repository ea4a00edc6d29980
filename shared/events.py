"""Event envelope and the data model of every event type (docs/contract.md#events).

The envelope is the same for all events; `data` is validated against the model registered for `type`.
The JSON Schemas published for consumers outside this project are generated from these models.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

import msgspec
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import to_jsonable_python

SCHEMA_VERSION = 1

MacAddress = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", to_lower=True, strip_whitespace=True)
]


@functools.lru_cache(maxsize=65_536)
def _ipv4(text: str) -> IPv4Address:
    return IPv4Address(text)


def _cached_ipv4(value: Any) -> Any:
    # Parsing a dotted quad costs ~10 µs in the ipaddress module; claims name the same HAVIP addresses again and
    # again, so the hot path looks them up instead. Anything not a string is left to pydantic's own checks.
    if isinstance(value, str) and len(value) <= 15:
        try:
            return _ipv4(value)
        except ValueError:
            return value  # pydantic reports it
    return value


# An IPv4 address in an event (JSON Schema: a string of format ipv4), parsed through a cache.
Ipv4 = Annotated[IPv4Address, BeforeValidator(_cached_ipv4)]


# A layer-2 segment (docs/contract.md#segments): the name operators give a watcher's interface and the subnets
# attached to it. One segment needs no configuration: every watcher and every subnet is on DEFAULT_SEGMENT unless
# told.
DEFAULT_SEGMENT = "default"
SegmentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
# A subnet attached to a VLAN of its segment (segments sharing a trunk); none: the whole segment.
Vlan = Annotated[int, Field(ge=1, le=4094)]


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- arp_watcher -------------------------------------------------------------------------------------------

ClaimKind = Literal["garp_request", "arp_reply"]
CLAIMS_EVENT = "arp.claims.observed"
REPLAY_REQUESTED = "havip.binding.replay_requested"
MAX_CLAIMS_PER_EVENT = 10_000


# Kernel capture times are nanoseconds since the Unix epoch, stored as a Postgres bigint.
MAX_CAPTURED_NS = 2**63 - 1


class ObservedClaim(EventData):
    """One claim (docs/contract.md#claims): an ARP frame that asserts "sender_mac has sender_ip", with the
    identical frames the watcher folded into it."""

    claim_id: uuid.UUID = Field(description="unique per claim: consumers drop a claim they have already seen")
    vlan: int | None = Field(default=None, ge=0, le=4095)
    kind: ClaimKind
    sender_mac: MacAddress
    eth_src: MacAddress
    sender_ip: Ipv4
    target_ip: Ipv4
    captured_at: int = Field(
        gt=0, le=MAX_CAPTURED_NS, description="kernel receive time, nanoseconds since the Unix epoch"
    )
    repeats: int = Field(
        default=1,
        ge=1,
        description="frames this claim stands for: itself and the identical frames (same address, MAC, "
        "Ethernet source, VLAN) folded in since the previous published one",
    )


class ClaimsObserved(EventData):
    """Claims captured by one watcher, published as soon as captured (never held back to fill a batch)."""

    watcher_id: str = Field(min_length=1, max_length=200)
    interface: str = Field(min_length=1, max_length=15)
    segment: SegmentName = Field(
        default=DEFAULT_SEGMENT,
        description="the layer-2 segment the watcher's interface is on: claims concern its subnets",
    )
    claims: list[ObservedClaim] = Field(min_length=1, max_length=MAX_CLAIMS_PER_EVENT)


WATCHER_HEARTBEAT_EVENT = "arp.watcher.heartbeat"
MAX_HEARTBEAT_INTERVAL_S = 3600.0


class WatcherHeartbeat(EventData):
    """A watcher says it is alive, every `interval_s` while it is connected to the broker: the binding service
    counts the watchers of each segment heard within 3 intervals (docs/contract.md#watcher-heartbeats). Never
    stored; a heartbeat that cannot be published is skipped, the next one says the same."""

    watcher_id: str = Field(min_length=1, max_length=200, description="unique among the watchers of a segment")
    interface: str = Field(min_length=1, max_length=15)
    segment: SegmentName = Field(default=DEFAULT_SEGMENT, description="the layer-2 segment it watches")
    interval_s: float = Field(
        gt=0, le=MAX_HEARTBEAT_INTERVAL_S, description="seconds until the next heartbeat from this watcher"
    )
    started_at: datetime = Field(description="when this watcher process started")
    sequence: int = Field(
        ge=1, description="numbers this process's heartbeats from 1: one that could not be published leaves a gap"
    )
    kernel_drops: int = Field(
        ge=0, description="frames the kernel dropped since the start (capture buffer full): claims maybe missed"
    )
    claims_published: int = Field(ge=0, description="claims published and confirmed since the start")


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
    segment: SegmentName = Field(default=DEFAULT_SEGMENT, description="the layer-2 segment it is attached to")
    vlan: Vlan | None = Field(default=None, description="its VLAN on that segment; none: the whole segment")


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


ReleaseCause = Literal["released", "instance_deregistered", "candidates_changed"]


def rfc3339(moment: datetime) -> str:
    """A time as every event writes it (RFC 3339, UTC, `Z`) — the form pydantic gives the envelope's
    `occurred_at`, for data built JSON-ready on hot paths."""
    text: str = to_jsonable_python(moment.astimezone(UTC))
    return text


class Holder(EventData):
    instance_id: uuid.UUID
    mac: MacAddress


class BindingChanged(EventData):
    havip_id: uuid.UUID
    address: IPv4Address
    previous: Holder | None
    current: Holder | None
    captured_at: datetime | None
    committed_at: datetime = Field(
        description="when the transition was committed, as late as a time written inside its transaction can be: "
        "the database's clock (clock_timestamp()) as the last statement of that transaction began — the one "
        "that wrote the binding, the history row and this event, after everything else the transaction wrote; "
        "only its COMMIT followed, whose completion (a round trip and the WAL flush) is not included: the "
        "binding service measures from this stamp to COMMIT returned apart, "
        'havip_claim_hop_seconds{hop="committed"}. The same value as the history row\'s committed_at and the '
        "binding's last_transition_at; the transitions committed together share it"
    )
    watcher_id: str | None
    sequence: int = Field(ge=1)
    reason: Literal["claim", "release"]
    cause: ReleaseCause | None = Field(
        default=None,
        description="why a release ended the binding: the HAVIP released, its holder deregistered, or a "
        "candidate list that no longer names the holder; null for a claim (and for releases published "
        "before this field existed)",
    )


RejectReason = Literal["unknown_mac", "other_subnet", "not_candidate", "eth_mismatch", "clock_skew"]


class ClaimRejected(EventData):
    address: IPv4Address
    havip_id: uuid.UUID | None
    mac: MacAddress
    reason: RejectReason
    captured_at: datetime
    watcher_id: str
    count: int = Field(default=1, ge=1, description="frames folded into this refusal (same address, MAC, reason)")


class HavipCondition(EventData):
    """Edge of a flapping or split-brain condition."""

    havip_id: uuid.UUID
    address: IPv4Address
    transitions_in_window: int = Field(ge=0)
    claimants_in_window: int = Field(ge=0)


MAX_REPLAY_RANGES = 1000
MAX_REPLAY_SPAN = 10_000


class ReplayRange(EventData):
    """Transitions `first_sequence` … `last_sequence` (both included) of one HAVIP."""

    havip_id: uuid.UUID
    first_sequence: int = Field(ge=1)
    last_sequence: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReplayRange:
        if self.last_sequence < self.first_sequence:
            raise ValueError("last_sequence must not be below first_sequence")
        if self.last_sequence - self.first_sequence >= MAX_REPLAY_SPAN:
            raise ValueError(f"at most {MAX_REPLAY_SPAN} transitions per range")
        return self


class ReplayRequested(EventData):
    """A reader of `havip.binding.changed` asks the binding service to publish transitions again, as
    `havip.binding.replayed`: the ranges it found missing (sequence gaps), and/or the newest transition of every
    HAVIP (a starting point for a reader that begins after the binding service did)."""

    ranges: list[ReplayRange] = Field(default_factory=list, max_length=MAX_REPLAY_RANGES)
    newest_of_every_havip: bool = False


EVENT_TYPES: dict[str, type[EventData]] = {
    CLAIMS_EVENT: ClaimsObserved,
    WATCHER_HEARTBEAT_EVENT: WatcherHeartbeat,
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
    # Transitions published again on request (same data as havip.binding.changed, older sequences).
    "havip.binding.replayed": BindingChanged,
    REPLAY_REQUESTED: ReplayRequested,
    "havip.claim.rejected": ClaimRejected,
    "havip.flapping.started": HavipCondition,
    "havip.flapping.stopped": HavipCondition,
    "havip.split_brain.started": HavipCondition,
    "havip.split_brain.stopped": HavipCondition,
}


class Envelope(BaseModel):
    """What travels on `havip.events`: the routing key equals `type` (a claims event: `type` and its partition,
    shared.partitions)."""

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


def trusted_envelope(event_type: str, data: dict[str, Any], source: str) -> Envelope:
    """An envelope around data the caller built JSON-ready itself, not validated here (hot paths only; the
    caller's tests prove that what it builds validates against the type's model)."""
    if event_type not in EVENT_TYPES:
        raise TypeError(f"unknown event type {event_type!r}")
    return Envelope.model_construct(
        event_id=uuid.uuid4(),
        type=event_type,
        schema_version=SCHEMA_VERSION,
        occurred_at=datetime.now(UTC),
        source=source,
        data=data,
    )


@dataclass(frozen=True, slots=True)
class EventHead:
    """The envelope of a decoded event, without its data (validated into the type's model instead)."""

    event_id: uuid.UUID
    type: str
    schema_version: int
    occurred_at: datetime
    source: str


class _Peek(msgspec.Struct):
    """Just enough of an envelope to pick the model that validates the whole message in one pass."""

    type: str
    schema_version: int


_PEEK = msgspec.json.Decoder(_Peek)


def _typed_envelope(event_type: str, model: type[EventData]) -> type[BaseModel]:
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in Envelope.model_fields.items()}
    fields["data"] = (model, ...)
    name = "".join(part.capitalize() for part in event_type.replace(".", "_").split("_")) + "Envelope"
    return create_model(name, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


_TYPED_ENVELOPES: dict[str, type[BaseModel]] = {t: _typed_envelope(t, m) for t, m in EVENT_TYPES.items()}


def decode(body: bytes) -> tuple[EventHead, EventData]:
    """Parse and validate a message body (envelope and data, in one pass of pydantic's JSON validator); raise
    InvalidEvent with a clear reason otherwise."""
    try:
        peek = _PEEK.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidEvent(f"not a valid event envelope: {exc}") from exc
    typed = _TYPED_ENVELOPES.get(peek.type)
    if typed is None:
        raise InvalidEvent(f"unknown event type {peek.type!r}")
    if peek.schema_version != SCHEMA_VERSION:
        raise InvalidEvent(f"unsupported schema_version {peek.schema_version} for {peek.type!r}")
    try:
        env: Any = typed.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid {peek.type!r} event: {exc.errors(include_url=False)}") from exc
    head = EventHead(env.event_id, env.type, env.schema_version, env.occurred_at, env.source)
    return head, env.data


def encode(env: Envelope) -> bytes:
    return env.model_dump_json().encode()
