"""Settings common to every service, read from `HAVIP_`-prefixed environment variables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Self, TextIO
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from shared.partitions import DEFAULT_PARTITIONS, MAX_PARTITIONS
from shared.tls import check_ca_file

# The AMQP heartbeat asked of a cluster's nodes unless one is configured (RabbitMQ suggests 60 s): aiormq drops a
# connection silent for three heartbeats and one (12 s), so that a frozen node is noticed before the others have
# declared it down (within 13.5 s with net_ticktime = 10), when its clients move (ClusterConnection).
CLUSTER_HEARTBEAT_S = 3

# The net_ticktime assumed of a cluster unless configured (docs/operations.md's rabbitmq.conf), and the time
# allowed beyond 1.25 × it for the nodes to act on a peer's silence.
CLUSTER_NET_TICKTIME_S = 10
NODE_DOWN_MARGIN_S = 1.0

# How long a publish waits for its confirm unless configured: one node, several.
PUBLISH_TIMEOUT_S = 5.0
CLUSTER_PUBLISH_TIMEOUT_S = 2.0

# aiormq's TLS options in a URL's query: the services take TLS from HAVIP_AMQP_CA_FILE instead, the same for every
# node, and never switch verification off.
URL_TLS_OPTIONS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")

# The exit status of a service started with a configuration it cannot run with.
EXIT_INVALID_SETTINGS = 2


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HAVIP_", extra="ignore", frozen=True)

    # One broker, or the nodes of a RabbitMQ cluster as several URLs separated by commas (the same user and
    # virtual host on each): a process connects to one of them and moves to the next when its node dies or
    # stops answering (amqp_heartbeat_s).
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # The AMQP heartbeat asked of the broker, in seconds: how soon a frozen broker node is noticed (about three
    # heartbeats). Unset: 3 s with several nodes, else the broker's own (RabbitMQ suggests 60 s). A heartbeat
    # given in the URL wins.
    amqp_heartbeat_s: int | None = Field(default=None, ge=1, le=600)
    # The cluster's net_ticktime, in seconds (rabbitmq.conf; 10 in docs/operations.md, 60 by RabbitMQ's default):
    # its nodes declare a silent peer down within 1.25 × it. A process whose node stops answering (frozen, cut off)
    # connects to another only once that node must have been declared down, because until then a quorum queue it
    # led holds the publishes and consumers of a new connection (for seconds after, too). Unset: 10 s with several
    # nodes.
    amqp_net_ticktime_s: int | None = Field(default=None, ge=1, le=3600)
    # The kind of every queue the services declare: quorum queues are replicated on a majority of a cluster's
    # nodes and survive the loss of one; classic ones live on one node. `auto`: quorum when HAVIP_AMQP_URL
    # names several nodes. (Queues with a single active consumer are quorum queues in every case.)
    amqp_queue_type: Literal["auto", "classic", "quorum"] = "auto"
    # The CA certificates (PEM) that amqps:// nodes are verified against — the chain and the host name in the
    # URL; unset: the system's. Only with amqps:// URLs; verification cannot be switched off.
    amqp_ca_file: Path | None = None
    # Prefix for every exchange and queue name, so that tests and parallel deployments never share them.
    amqp_prefix: str = ""
    # One Postgres, or a primary and its standbys as libpq's multi-host URL with target_session_attrs=read-write
    # (postgresql://user@host1:5432,host2:5432/havip?target_session_attrs=read-write): every new connection goes
    # to whichever is the primary, so that the services follow a failover by themselves.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/havip"
    # The failover manager's monitor (pg_auto_failover), asked every few seconds for its nodes' states: exported as
    # havip_database_monitor_up and havip_database_monitor_nodes. Unset: not asked.
    database_monitor_url: str | None = None
    # The database role the service acts as (it owns the service's schema and nothing else); unset: the
    # service's own, havip_<service>. `migrate` creates it when it is missing.
    database_role: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # A publish not confirmed within this many seconds fails, to be tried again on a new channel
    # (shared.messaging). Unset: 2 s with several nodes — a channel that met the lost leader of a frozen node's
    # queue never confirms; one opened after the node is declared down does — else 5 s.
    publish_timeout_s: float | None = Field(default=None, gt=0)
    # Claims are decided in this many partitions (shared.partitions): the watchers and every binding replica
    # must agree on it (an alert fires when they do not). Changing it moves HAVIPs between partitions: change it
    # on every process at once.
    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1, le=MAX_PARTITIONS)

    @field_validator("amqp_url")
    @classmethod
    def _broker_addresses(cls, value: str) -> str:
        broker_urls(value)  # raises ValueError, in words, for a list it cannot use
        return value

    @field_validator("database_url", "database_monitor_url")
    @classmethod
    def _database_ca(cls, value: str | None) -> str | None:
        """The CA file a URL names (sslrootcert), checked at start rather than at the first connection."""
        if value is not None:
            root = parse_qs(urlsplit(value).query).get("sslrootcert")
            if root and root[0] != "system":
                check_ca_file(root[0])
        return value

    @field_validator("amqp_ca_file")
    @classmethod
    def _readable_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            check_ca_file(value)
        return value

    @model_validator(mode="after")
    def _ca_only_with_tls(self) -> Self:
        if self.amqp_ca_file is not None and not self.amqp_tls:
            raise ValueError(
                "HAVIP_AMQP_CA_FILE is set but HAVIP_AMQP_URL names amqp:// nodes (no TLS): use amqps:// "
                "(RabbitMQ's TLS port, 5671 by default), or unset HAVIP_AMQP_CA_FILE"
            )
        return self

    @property
    def amqp_tls(self) -> bool:
        """Whether the nodes are reached over TLS (amqps://: all of them, or none — broker_urls)."""
        return URL(broker_urls(self.amqp_url)[0]).scheme == "amqps"

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker nodes, in the order given, each with the heartbeat asked for."""
        urls = broker_urls(self.amqp_url)
        heartbeat = self.amqp_heartbeat_s
        if heartbeat is None and len(urls) > 1:
            heartbeat = CLUSTER_HEARTBEAT_S  # a frozen node is left within seconds, not a minute
        if heartbeat is None:
            return urls
        asked = {"heartbeat": heartbeat}
        return tuple(url if "heartbeat" in URL(url).query else str(URL(url) % asked) for url in urls)

    @property
    def silent_node_down_s(self) -> float | None:
        """How long after a node's last word its peers must have declared it down (None with one node)."""
        if len(broker_urls(self.amqp_url)) == 1:
            return None
        ticktime = self.amqp_net_ticktime_s or CLUSTER_NET_TICKTIME_S
        return ticktime * 1.25 + NODE_DOWN_MARGIN_S

    @property
    def publish_timeout(self) -> float:
        """publish_timeout_s, or its default for one node or for several."""
        if self.publish_timeout_s is not None:
            return self.publish_timeout_s
        return CLUSTER_PUBLISH_TIMEOUT_S if len(broker_urls(self.amqp_url)) > 1 else PUBLISH_TIMEOUT_S

    @property
    def quorum_queues(self) -> bool:
        if self.amqp_queue_type == "auto":
            return len(broker_urls(self.amqp_url)) > 1
        return self.amqp_queue_type == "quorum"

    @property
    def amqp_vhost(self) -> str:
        return URL(broker_urls(self.amqp_url)[0]).path[1:] or "/"

    @property
    def amqp_user(self) -> str:
        """The broker user the process logs in as (a URL without one logs in as guest): named in messages about
        its rights, and stamped on every message it publishes (RabbitMQ checks it)."""
        return URL(broker_urls(self.amqp_url)[0]).user or "guest"

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


def broker_urls(value: str) -> tuple[str, ...]:
    """The broker URLs of HAVIP_AMQP_URL (comma-separated); ValueError saying what is wrong, without the
    passwords."""
    urls = tuple(part.strip() for part in value.split(",") if part.strip())
    if not urls:
        raise ValueError("no broker URL given")
    users_and_vhosts = set()
    schemes = set()
    for n, url in enumerate(urls, start=1):
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise ValueError(f"broker URL {n} cannot be read: {exc}") from None
        if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
            raise ValueError(f"broker URL {n} is not amqp://host[:port]/vhost or amqps://…")
        users_and_vhosts.add((parsed.user, parsed.path))
        schemes.add(parsed.scheme)
        options = [option for option in URL_TLS_OPTIONS if option in parsed.query]
        if options:
            raise ValueError(
                f"broker URL {n} sets {', '.join(options)}: TLS is configured by amqps:// and HAVIP_AMQP_CA_FILE "
                "(the CA the nodes are verified against), the same for every node; verification cannot be "
                "switched off"
            )
    if len(schemes) > 1:
        raise ValueError("some broker URLs are amqps:// and others amqp://: TLS to every node, or to none")
    if len(users_and_vhosts) > 1:
        raise ValueError("the broker URLs name different users or virtual hosts: they must be one cluster's nodes")
    return urls


def print_invalid_settings(
    settings_type: type[BaseSettings], exc: ValidationError, file: TextIO | None = None
) -> int:
    """Say what is wrong with the configuration, one line per problem naming the environment variable to fix
    (`HAVIP_X: what is wrong`) and never the value given (it may be a secret); returns the exit status."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            lines.append(f"  {_variable(settings_type, str(error['loc'][0]))}: {message}")
        else:  # the settings as a whole (a validator of several fields): its message names them
            lines.append(f"  {message}")
    print("invalid configuration:\n" + "\n".join(lines), file=sys.stderr if file is None else file)
    return EXIT_INVALID_SETTINGS


def _variable(settings_type: type[BaseSettings], field: str) -> str:
    """The environment variable of a field: its alias if it has one (no prefix then), else prefix + name."""
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    for name, info in settings_type.model_fields.items():
        if field in (name, info.validation_alias):
            alias = info.validation_alias
            return alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper()
    return f"{prefix}{field}".upper()
