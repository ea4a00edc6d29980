"""The events the binding publishes, each built in one place. A transition's `havip.binding.changed` and, read
back from the history, its `havip.binding.replayed` carry the same data, built by `transition_data`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.binding.domain import ConditionEdge, Holder, Transition, ns_to_datetime
from services.binding.refusal_audit import RejectedClaim
from shared import events

SOURCE = "binding"


def transition_data(transition: Transition, committed_at: datetime | None) -> dict[str, Any]:
    """A transition as JSON-ready BindingChanged data, without validation: up to 10,000 of them leave in one
    batch during a mass failover. tests/unit/test_binding_events.py proves it validates against the model."""
    captured_ns = transition.captured_ns
    return {
        "havip_id": str(transition.havip_id),
        "address": str(transition.address),
        "previous": _holder(transition.previous),
        "current": _holder(transition.current),
        "captured_at": events.rfc3339(ns_to_datetime(captured_ns)) if captured_ns else None,
        "committed_at": events.rfc3339(committed_at) if committed_at is not None else None,
        "watcher_id": transition.watcher_id,
        "sequence": transition.sequence,
        "reason": transition.reason,
        "cause": transition.cause,
    }


def binding_changed(transition: Transition) -> events.Envelope:
    """The event of a transition being written. Its `committed_at` is left null: the statement that writes the
    event stamps it (repository.COMMITTED_AT_SLOT)."""
    return events.trusted_envelope("havip.binding.changed", transition_data(transition, None), SOURCE)


def binding_replayed(transition: Transition, committed_at: datetime) -> events.Envelope:
    """A committed transition published again, for a reader's replay request."""
    return events.trusted_envelope("havip.binding.replayed", transition_data(transition, committed_at), SOURCE)


def condition_edge(edge: ConditionEdge) -> events.Envelope:
    return events.envelope(
        f"havip.{edge.condition}.{'started' if edge.started else 'stopped'}",
        events.HavipCondition(
            havip_id=edge.havip_id,
            address=edge.address,
            transitions_in_window=edge.transitions_in_window,
            claimants_in_window=edge.claimants_in_window,
        ),
        SOURCE,
    )


def claim_rejected(row: RejectedClaim) -> events.Envelope:
    return events.envelope(
        "havip.claim.rejected",
        events.ClaimRejected(
            address=row.address,
            havip_id=row.havip_id,
            mac=row.mac,
            reason=row.reason,
            captured_at=row.captured_at,
            watcher_id=row.watcher_id,
            count=row.count,
        ),
        SOURCE,
    )


def _holder(holder: Holder | None) -> dict[str, str] | None:
    return None if holder is None else {"instance_id": str(holder.instance_id), "mac": holder.mac}
