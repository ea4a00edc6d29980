"""Configuration of the binding service (HAVIP_ environment variables)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class BindingSettings(CommonSettings):
    metrics_port: int = Field(default=9103, ge=0, le=65535)  # 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    prefetch: int = Field(default=2000, ge=1, le=65535)
    max_batch: int = Field(default=1000, ge=1)
    # Claims captured further ahead of this service's clock are refused as clock_skew (SPEC §5.2).
    max_clock_skew_s: float = Field(default=2.0, gt=0, le=3600)
