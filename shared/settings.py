"""Settings common to every service, read from `HAVIP_`-prefixed environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HAVIP_", extra="ignore", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Prefix for every exchange and queue name, so that tests and parallel deployments never share them.
    amqp_prefix: str = ""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/havip"
    # The database role the service acts as (it owns the service's schema and nothing else); unset: the
    # service's own, havip_<service>. `migrate` creates it when it is missing.
    database_role: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    publish_timeout_s: float = Field(default=5.0, gt=0)

    @property
    def exchange(self) -> str:
        return f"{self.amqp_prefix}havip.events"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.amqp_prefix}havip.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.amqp_prefix}havip.dead"

    def queue(self, name: str) -> str:
        return f"{self.amqp_prefix}{name}"
