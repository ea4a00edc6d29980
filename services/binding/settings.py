"""Configuration of the binding service (HAVIP_ environment variables)."""

from __future__ import annotations

import socket

from pydantic import Field, model_validator

from services.binding.audit_pacing import DEFAULT_REFUSAL_AUDIT_RATE
from services.binding.domain import ConditionPolicy
from shared.settings import CommonSettings

# A user name with `{segment}` in it once.
WATCHER_USER_TEMPLATE = r"^[A-Za-z0-9_.@-]*\{segment\}[A-Za-z0-9_.@-]*$"


class BindingSettings(CommonSettings):
    # This replica's name in logs and its connections' names; it also spreads the replicas' first tries over the
    # partitions. Default: the host name.
    replica_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    # How often a replica looks at the partitions' advisory locks (it also wakes when another hands one over),
    # and after how long Postgres ends the session of a replica that stopped speaking (frozen): its partitions
    # are then free for the others (services/binding/leases.py).
    lease_interval_s: float = Field(default=0.2, gt=0, le=60)
    lease_timeout_s: float = Field(default=10.0, ge=1, le=3600)
    metrics_port: int = Field(default=9103, ge=0, le=65535)  # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    prefetch: int = Field(default=2000, ge=1, le=65535)
    max_batch: int = Field(default=1000, ge=1)
    # Messages of the routine lane (holders' refreshes, as the watchers mark them) taken per batch: they are
    # decided one by one and written together, while any other message may be decided in between.
    routine_batch: int = Field(default=16, ge=1, le=10_000)
    # Claims captured further ahead of this service's clock are refused as clock_skew
    # (docs/contract.md#clock-skew).
    max_clock_skew_s: float = Field(default=2.0, gt=0, le=3600)
    # New refusal audit rows (and their events) a second at most, in bites of a tenth of it: a flood over many
    # addresses is audited at this pace, every frame still counted (AuditPacer).
    refusal_audit_rate: float = Field(default=DEFAULT_REFUSAL_AUDIT_RATE, gt=0, le=100_000)
    # Refused claims are summed up in one log line this often (when there were any): per reason, frames and the
    # distinct claimants — the audit and the metrics have the detail.
    refusal_log_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    # Refused claims are kept this long in the audit (binding.rejected_claims), then deleted.
    audit_retention_days: float = Field(default=30.0, gt=0, le=3650)
    # Flapping: more than this many transitions within the window (docs/contract.md#flapping).
    flap_transitions: int = Field(default=5, ge=1, le=10_000)
    flap_window_s: float = Field(default=60.0, gt=0, le=86_400)
    # Split brain: the authorised claimant changed this many times within the window
    # (docs/contract.md#split-brain).
    split_brain_changes: int = Field(default=3, ge=2, le=10_000)
    split_brain_window_s: float = Field(default=10.0, gt=0, le=86_400)
    # The RabbitMQ user each segment's watchers publish as, `{segment}` standing for the segment's name (e.g.
    # `havip-watcher-{segment}`): claims and heartbeats of a segment from any other user are dropped, counted
    # (havip_watcher_messages_refused_total) and logged, so that a watcher's credentials speak for its own segment
    # only. RabbitMQ vouches for the user (a message's user_id must be its connection's). Unset: not checked.
    watcher_user_template: str | None = Field(default=None, pattern=WATCHER_USER_TEMPLATE)

    @model_validator(mode="after")
    def _lease_outlives_polls(self) -> BindingSettings:
        if self.lease_timeout_s < 3 * self.lease_interval_s:
            raise ValueError(
                "HAVIP_LEASE_TIMEOUT_S must be at least 3 × HAVIP_LEASE_INTERVAL_S: a replica that is alive would "
                "otherwise lose its partitions between two looks"
            )
        return self

    def condition_policy(self) -> ConditionPolicy:
        return ConditionPolicy(
            flap_transitions=self.flap_transitions,
            flap_window_ns=int(self.flap_window_s * 1e9),
            split_changes=self.split_brain_changes,
            split_window_ns=int(self.split_brain_window_s * 1e9),
        )
