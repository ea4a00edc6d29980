"""The allocator's configuration: the common `HAVIP_` settings plus the API's own.

| variable | default | meaning |
|---|---|---|
| `HAVIP_API_TOKEN` | — | bearer token every `/v1` call must present (printable ASCII, no spaces) |
| `HAVIP_INSECURE_NO_AUTH` | false | development only: start without a token and accept every call |
| `HAVIP_HOST` / `HAVIP_PORT` | 127.0.0.1 / 8080 | where the HTTP server listens (0.0.0.0 in a container) |
| `HAVIP_TLS_CERT_FILE` | — | PEM certificate (then its intermediates): serve HTTPS (with the key below) |
| `HAVIP_TLS_KEY_FILE` | — | that certificate's PEM private key, unencrypted, in a file only the allocator reads |
| `HAVIP_QUOTA_PER_VPC` | 10 | most HAVIPs one VPC may hold |
| `HAVIP_MAX_BODY_BYTES` | 65536 | largest request body accepted |
| `HAVIP_EIP_POOL` | empty | the public pool EIPs are taken from (below) |
| `HAVIP_IDEMPOTENCY_TTL_HOURS` | 24 | how long an `Idempotency-Key` is remembered (at least 24) |
| `HAVIP_IDEMPOTENCY_PURGE_INTERVAL_S` | 600 | how often expired keys are deleted |
| `HAVIP_AUDIT_RETENTION_DAYS` | 30 | refused claims are kept that long in the view (as in the binding's audit) |
| `HAVIP_VIEW_GAP_GRACE_S` | 5 | a gap in a HAVIP's transitions lasting longer is repaired: a replay is asked for |
| `HAVIP_VIEW_REPAIR_RETRY_S` | 60 | a replay asked for and not answered is asked for again after that long… |
| `HAVIP_VIEW_REPAIR_ATTEMPTS` | 10 | …that many times at most (the gap stays counted in `havip_view_open_gaps`) |

Use a long random token (`openssl rand -hex 32`); one shorter than 16 characters is accepted with a warning.

Without `HAVIP_TLS_CERT_FILE` and `HAVIP_TLS_KEY_FILE` the allocator serves plain HTTP, for a reverse proxy that
terminates TLS in front of it (docs/deploy.md, "Behind a reverse proxy"). With both it serves HTTPS only — the API,
`/healthz`, `/readyz`, `/metrics` and the documentation alike — with TLS 1.2 at the oldest. Both or neither: one
alone is refused, and so is a file that is missing, unreadable, not PEM, a key encrypted with a passphrase, or a
key that is not the certificate's; the messages name the variable and the path, never what the files hold. The
files are read once, at start: a renewed certificate takes a restart.

`HAVIP_EIP_POOL` is comma-separated IPv4 addresses and CIDR blocks, e.g. `203.0.113.0/28, 198.51.100.7`; a
block gives its host addresses (as `ipaddress.hosts()`: without the network and broadcast addresses from /30
up). Empty, the default: EIPs are not available, association answers 409 `EIP_POOL_NOT_CONFIGURED`. A public
pool belongs to the deployment, so no addresses are assumed.

And `HAVIP_DATABASE_URL`, `HAVIP_AMQP_URL`, `HAVIP_AMQP_PREFIX`, `HAVIP_LOG_LEVEL`, `HAVIP_PUBLISH_TIMEOUT_S`
from `shared.settings.CommonSettings`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from services.allocator import tls
from services.allocator.domain.eips import EipPool
from shared.settings import CommonSettings

_TOKEN = re.compile(r"^[\x21-\x7e]{1,512}$")
RECOMMENDED_TOKEN_LENGTH = 16


class AllocatorSettings(CommonSettings):
    api_token: SecretStr | None = None
    insecure_no_auth: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # HTTPS when both are set (services/allocator/tls.py); plain HTTP, behind a proxy terminating TLS, otherwise.
    tls_cert_file: Path | None = None
    # Checked after the certificate (declared after it), and when unset too: both or neither.
    tls_key_file: Path | None = Field(default=None, validate_default=True)
    # The alias keeps the variable readable: HAVIP_QUOTA_PER_VPC rather than HAVIP_HAVIP_QUOTA_PER_VPC.
    havip_quota_per_vpc: int = Field(default=10, ge=0, le=100_000, validation_alias="havip_quota_per_vpc")
    max_body_bytes: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    eip_pool: str = ""
    # Keys are kept at least 24 hours (docs/contract.md#http-api), so a client may retry for a day whatever the
    # configuration says.
    idempotency_ttl_hours: int = Field(default=24, ge=24, le=24 * 366)
    idempotency_purge_interval_s: float = Field(default=600.0, gt=0, le=86_400)
    # The read model of the binding service's state (binding_view/).
    audit_retention_days: float = Field(default=30.0, gt=0, le=3650)
    view_gap_grace_s: float = Field(default=5.0, ge=0, le=3600)
    view_repair_retry_s: float = Field(default=60.0, gt=0, le=86_400)
    view_repair_attempts: int = Field(default=10, ge=1, le=1000)
    view_maintenance_interval_s: float = Field(default=2.0, gt=0, le=3600)
    view_prefetch: int = Field(default=1000, ge=1, le=65535)
    view_max_batch: int = Field(default=500, ge=1)

    @field_validator("eip_pool")
    @classmethod
    def _eip_pool_shape(cls, value: str) -> str:
        EipPool.parse(value)  # raises ValueError with the offending entry
        return value

    @field_validator("tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tls_cert_file")
    @classmethod
    def _certificate_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls.check_certificate_file(value)  # raises ValueError naming the path, never the content
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _key_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert_file" not in info.data:  # the certificate's own problem is already reported
            if value is not None:
                tls.check_key_file(value)
            return value
        certificate: Path | None = info.data["tls_cert_file"]
        if value is None:
            if certificate is not None:
                raise ValueError(
                    "not set while HAVIP_TLS_CERT_FILE is: set both to serve HTTPS, or neither to serve plain HTTP"
                )
            return value
        if certificate is None:
            raise ValueError(
                "set without HAVIP_TLS_CERT_FILE: set both to serve HTTPS, or neither to serve plain HTTP"
            )
        tls.check_key_file(value)
        tls.check_pair(certificate, value)
        return value

    @property
    def https(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def eips(self) -> EipPool:
        return EipPool.parse(self.eip_pool)

    @field_validator("api_token")
    @classmethod
    def _token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never repeats the value: it is a secret.
        if value is not None and not _TOKEN.match(value.get_secret_value()):
            raise ValueError("the API token must be 1 to 512 printable ASCII characters without spaces")
        return value

    @property
    def weak_token(self) -> bool:
        return self.api_token is not None and len(self.api_token.get_secret_value()) < RECOMMENDED_TOKEN_LENGTH

    @model_validator(mode="after")
    def _token_required(self) -> AllocatorSettings:
        if self.api_token is None and not self.insecure_no_auth:
            raise ValueError(
                "no API token configured: set HAVIP_API_TOKEN "
                "(or HAVIP_INSECURE_NO_AUTH=true for local development only)"
            )
        return self
