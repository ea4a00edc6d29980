"""The binding service builds its hot-path events without pydantic; they must validate against the contract."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Address

from hypothesis import example, given
from hypothesis import strategies as st

from services.binding.domain import Holder, Transition
from services.binding.repository import COMMITTED_AT_SLOT
from services.binding.service import binding_changed
from shared.events import BindingChanged, decode, encode

holders = st.none() | st.builds(
    Holder, instance_id=st.uuids(), mac=st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))
)


@given(
    previous=holders,
    current=holders,
    sequence=st.integers(1, 2**62),
    reason=st.sampled_from(["claim", "release"]),
    captured_ns=st.none() | st.integers(1, 2**63 - 1),
    watcher_id=st.none() | st.text(min_size=1, max_size=50),
    address=st.integers(0, 2**32 - 1).map(IPv4Address),
)
# A watcher id that spells the slot: escaped in JSON, it never matches the slot the statement stamps.
@example(None, None, 1, "claim", None, COMMITTED_AT_SLOT, IPv4Address("192.0.2.1"))
def test_binding_changed_validates_against_the_model(
    previous: Holder | None,
    current: Holder | None,
    sequence: int,
    reason: str,
    captured_ns: int | None,
    watcher_id: str | None,
    address: IPv4Address,
) -> None:
    havip_id = uuid.uuid4()
    committed_at = datetime.now(UTC)
    transition = Transition(havip_id, address, previous, current, sequence, reason, captured_ns, watcher_id)  # type: ignore[arg-type]
    body = encode(binding_changed(transition))
    assert body.count(COMMITTED_AT_SLOT.encode()) == 1  # the one place the writing statement stamps
    # What the writing statement puts there (repository._WRITE_DECISIONS, to_char in the `Z` form).
    stamped = body.replace(
        COMMITTED_AT_SLOT.encode(), f'"committed_at":"{committed_at:%Y-%m-%dT%H:%M:%S.%fZ}"'.encode()
    )
    head, data = decode(stamped)
    assert head.type == "havip.binding.changed"
    assert isinstance(data, BindingChanged)
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
