"""havipctl's configuration: each setting from its flag, else its environment variable, else a default.

| flag | variable | default |
|---|---|---|
| `--url` | `HAVIP_URL` | http://127.0.0.1:8080 |
| `--token` | `HAVIP_API_TOKEN` | none (the allocator then answers 401) |
| `--connect-timeout` | `HAVIP_CONNECT_TIMEOUT` | 5 s |
| `--request-timeout` | `HAVIP_REQUEST_TIMEOUT` | 30 s |
| `--cacert FILE` | `HAVIP_CA_FILE` | none: an https:// allocator is verified against the system's CAs |
| `--amqp-url` | `HAVIP_AMQP_URL` | amqp://guest:guest@127.0.0.1:5672/; a cluster's nodes comma-separated |
| `--amqp-cacert FILE` | `HAVIP_AMQP_CA_FILE` | none: an amqps:// node is verified against the system's CAs |
| `--amqp-prefix` | `HAVIP_AMQP_PREFIX` | empty (as the services' own setting) |

An https:// allocator's certificate is always verified, against the CA certificates (PEM) of `--cacert` when given,
and so is an amqps:// broker node's, against those of `--amqp-cacert`; a CA file that cannot be read or holds no
certificate is a usage error. The variables are the services' own, so that a shell configured for them (a cluster's
nodes comma-separated in HAVIP_AMQP_URL, the broker's CA in HAVIP_AMQP_CA_FILE) works for havipctl as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from havipctl.client import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_URL, tls_context
from havipctl.errors import UsageError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

ENV_URL = "HAVIP_URL"
ENV_TOKEN = "HAVIP_API_TOKEN"
ENV_CONNECT_TIMEOUT = "HAVIP_CONNECT_TIMEOUT"
ENV_REQUEST_TIMEOUT = "HAVIP_REQUEST_TIMEOUT"
ENV_CA_FILE = "HAVIP_CA_FILE"
ENV_AMQP_URL = "HAVIP_AMQP_URL"
ENV_AMQP_CA_FILE = "HAVIP_AMQP_CA_FILE"
ENV_AMQP_PREFIX = "HAVIP_AMQP_PREFIX"

_TOKEN = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True, slots=True)
class Config:
    url: str = DEFAULT_URL
    token: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    ca_file: str | None = None  # None: the system's CAs
    amqp_url: str = DEFAULT_AMQP_URL  # as given: one node, or a cluster's nodes comma-separated
    amqp_prefix: str = ""
    amqp_ca_file: str | None = None  # None: the system's CAs, for amqps:// nodes

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker nodes, in the order given."""
        return split_amqp_urls(self.amqp_url)


def split_amqp_urls(text: str) -> tuple[str, ...]:
    """`amqp://a/,amqp://b/` → both URLs; blanks around the commas ignored."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds (raises ValueError otherwise)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


def _pick(
    flag: str | None, env: Mapping[str, str], variable: str, flag_name: str | None = None
) -> tuple[str | None, str]:
    """The flag's value, else the variable's (empty = unset); and where it came from, for messages."""
    if flag is not None:
        return flag, flag_name or "--" + variable.removeprefix("HAVIP_").lower().replace("_", "-")
    value = env.get(variable)
    return (value if value else None), variable


def _seconds(flag: str | None, env: Mapping[str, str], variable: str, default: float) -> float:
    text, source = _pick(flag, env, variable)
    if text is None:
        return default
    try:
        return parse_seconds(text)
    except ValueError:
        raise UsageError(f"{source}: expected a positive number of seconds, got {text!r}") from None


def _has_host(url: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in schemes and bool(parts.hostname)
    except ValueError:
        return False


def _ca_file(flag: str | None, env: Mapping[str, str], variable: str, flag_name: str) -> str | None:
    """A CA file to verify a server against, checked now: one that cannot be read or holds no certificate is a
    usage error."""
    ca_file, source = _pick(flag, env, variable, flag_name)
    if ca_file is not None:
        try:
            tls_context(ca_file)
        except ValueError as exc:
            raise UsageError(f"{source}: {exc}") from None
    return ca_file


def resolve(
    env: Mapping[str, str],
    *,
    url: str | None = None,
    token: str | None = None,
    connect_timeout: str | None = None,
    request_timeout: str | None = None,
    cacert: str | None = None,
    amqp_url: str | None = None,
    amqp_prefix: str | None = None,
    amqp_cacert: str | None = None,
) -> Config:
    """Flags over environment over defaults; a value that cannot work is a UsageError (exit 2)."""
    chosen_url, url_source = _pick(url, env, ENV_URL)
    chosen_url = (chosen_url or DEFAULT_URL).strip()
    if not _has_host(chosen_url, ("http", "https")):
        raise UsageError(f"{url_source}: expected an http:// or https:// URL, got {chosen_url!r}")

    chosen_token, token_source = _pick(token, env, ENV_TOKEN)
    if chosen_token is not None:
        chosen_token = chosen_token.strip()
        if not _TOKEN.match(chosen_token):
            raise UsageError(f"{token_source}: the token must be printable ASCII without spaces")

    ca_file = _ca_file(cacert, env, ENV_CA_FILE, "--cacert")

    chosen_amqp, amqp_source = _pick(amqp_url, env, ENV_AMQP_URL)
    chosen_amqp = (chosen_amqp or DEFAULT_AMQP_URL).strip()
    nodes = split_amqp_urls(chosen_amqp)
    if not nodes:
        raise UsageError(f"{amqp_source}: expected an amqp:// or amqps:// URL, or several comma-separated")
    for number, node in enumerate(nodes, 1):
        if not _has_host(node, ("amqp", "amqps")):
            where = f"node {number} of {len(nodes)}: " if len(nodes) > 1 else ""
            raise UsageError(f"{amqp_source}: {where}expected an amqp:// or amqps:// URL with a host")
    amqp_ca_file = _ca_file(amqp_cacert, env, ENV_AMQP_CA_FILE, "--amqp-cacert")

    prefix, _ = _pick(amqp_prefix, env, ENV_AMQP_PREFIX)
    return Config(
        url=chosen_url,
        token=chosen_token or None,
        connect_timeout=_seconds(connect_timeout, env, ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT_S),
        request_timeout=_seconds(request_timeout, env, ENV_REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_S),
        ca_file=ca_file,
        amqp_url=chosen_amqp,
        amqp_prefix=prefix or "",
        amqp_ca_file=amqp_ca_file,
    )
