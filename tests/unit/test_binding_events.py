"""The binding service builds its hot-path events without pydantic; they must validate against the contract."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Literal

from hypothesis import example, given
from hypothesis import strategies as st

from services.binding.domain import Holder, Transition
from services.binding.outgoing import binding_changed, binding_replayed
from services.binding.repository import COMMITTED_AT_SLOT, transition_of_row
from services.binding.service import HANDLERS, INVENTORY_EVENTS
from shared import events
from shared.events import EVENT_TYPES, BindingChanged, ReleaseCause, decode, encode, rfc3339

holders = st.none() | st.builds(
    Holder, instance_id=st.uuids(), mac=st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))
)


@given(
    previous=holders,
    current=holders,
    sequence=st.integers(1, 2**62),
    reason=st.sampled_from(["claim", "release"]),
    cause=st.sampled_from(["released", "instance_deregistered", "candidates_changed"]),
    captured_ns=st.none() | st.integers(1, 2**63 - 1),
    watcher_id=st.none() | st.text(min_size=1, max_size=50),
    address=st.integers(0, 2**32 - 1).map(IPv4Address),
)
# A watcher id that spells the slot: escaped in JSON, it never matches the slot the statement stamps.
@example(
    previous=None,
    current=None,
    sequence=1,
    reason="claim",
    cause="released",
    captured_ns=None,
    watcher_id=COMMITTED_AT_SLOT,
    address=IPv4Address("192.0.2.1"),
)
def test_binding_changed_validates_against_the_model(
    previous: Holder | None,
    current: Holder | None,
    sequence: int,
    reason: Literal["claim", "release"],
    cause: ReleaseCause,
    captured_ns: int | None,
    watcher_id: str | None,
    address: IPv4Address,
) -> None:
    havip_id = uuid.uuid4()
    committed_at = datetime.now(UTC)
    release_cause = cause if reason == "release" else None
    transition = Transition(
        havip_id,
        address,
        previous,
        current,
        sequence,
        reason,
        captured_ns,
        watcher_id,
        release_cause,
    )
    unstamped = encode(binding_changed(transition))
    assert unstamped.count(COMMITTED_AT_SLOT.encode()) == 1  # the one place the writing statement stamps
    # What the writing statement puts there (repository._WRITE_DECISIONS prints it as shared.events.rfc3339 does;
    # tests/integration/test_binding_commit_stamp.py checks the two agree).
    body = unstamped.replace(COMMITTED_AT_SLOT.encode(), f'"committed_at":"{rfc3339(committed_at)}"'.encode())
    head, data = decode(body)
    # One form of time throughout (RFC 3339, UTC, Z): the data's times as the envelope's.
    raw = json.loads(body)
    times = [raw["occurred_at"], raw["data"]["committed_at"], raw["data"]["captured_at"]]
    assert all(t.endswith("Z") and "+" not in t for t in times if t is not None), times
    assert head.type == "havip.binding.changed"
    assert isinstance(data, BindingChanged)
    assert data.cause == release_cause
    assert (data.havip_id, data.address, data.sequence, data.reason, data.watcher_id) == (
        havip_id,
        address,
        sequence,
        reason,
        watcher_id,
    )
    assert data.committed_at == committed_at
    assert (data.previous is None) == (previous is None)
    assert (data.current.mac if data.current else None) == (current.mac if current else None)
    if captured_ns is not None:
        assert data.captured_at is not None
        assert abs(data.captured_at.timestamp() * 1e9 - captured_ns) < 1e3 * max(1, captured_ns / 1e15)
    else:
        assert data.captured_at is None


@given(
    previous=holders,
    current=holders,
    sequence=st.integers(2, 2**62),
    captured_ns=st.none() | st.integers(1, 2**62),
    committed_at=st.datetimes(timezones=st.just(UTC)),
)
def test_a_replayed_transition_carries_the_data_it_was_first_published_with(
    previous: Holder | None,
    current: Holder | None,
    sequence: int,
    captured_ns: int | None,
    committed_at: datetime,
) -> None:
    transition = Transition(
        uuid.uuid4(), IPv4Address("192.0.2.7"), previous, current, sequence, "claim", captured_ns, "w1", None
    )
    history_row = {  # as the replay query reads it back (repository._REPLAY_COLUMNS)
        "havip_id": transition.havip_id,
        "sequence": sequence,
        "from_instance_id": previous.instance_id if previous else None,
        "from_mac": previous.mac if previous else None,
        "to_instance_id": current.instance_id if current else None,
        "mac": current.mac if current else None,
        "address": str(transition.address),
        "captured_ns": captured_ns,
        "committed_at": committed_at,
        "watcher_id": "w1",
        "reason": "claim",
        "cause": None,
    }
    replayed = binding_replayed(transition_of_row(history_row), committed_at)
    first = binding_changed(transition)
    assert replayed.type == "havip.binding.replayed"
    assert replayed.data == {**first.data, "committed_at": rfc3339(committed_at)}


def test_every_routing_key_the_binding_handles_is_an_event_of_the_contract() -> None:
    assert set(HANDLERS) <= set(EVENT_TYPES)
    assert set(INVENTORY_EVENTS) | {
        events.CLAIMS_EVENT,
        events.REPLAY_REQUESTED,
        events.WATCHER_HEARTBEAT_EVENT,
    } == set(HANDLERS)
