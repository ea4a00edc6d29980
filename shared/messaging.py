"""RabbitMQ adapter (aio-pika): one robust connection per process, a publishing channel with publisher
confirms, consuming channels of their own, manual ack after the handler's work is committed, and a
dead-letter exchange for messages that can never be processed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address
from typing import Any, NamedTuple, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import ChannelInvalidStateError
from prometheus_client import Counter, Gauge
from tenacity import AsyncRetrying, RetryCallState, RetryError
from yarl import URL

from shared.backoff import (
    WAIT_INITIAL_S,
    WAIT_MAX_S,
    at_once_then_retrying,
    failure_of,
    interruptible_sleep,
    retrying_with_backoff,
    wait_until_available,
)
from shared.events import CLAIMS_EVENT, Envelope, EventData, EventHead, InvalidEvent, decode, encode
from shared.partitions import claims_routing_key, partition_of
from shared.runtime import StartupError
from shared.settings import CommonSettings
from shared.tasks import cancel
from shared.tls import client_context, describe_tls_failure, naming_the_certificate

log = logging.getLogger(__name__)

T = TypeVar("T")

# Where an operator reads which rights each process's broker user needs, and how to give them.
RIGHTS_DOC = 'scripts/rabbitmq-users.sh; docs/operations.md, "Broker users and their rights"'


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded message handed to a consumer's handler."""

    envelope: EventHead
    data: EventData
    redelivered: bool
    received_ns: int = 0  # when the consumer got the message (wall clock, ns since the epoch)
    # The broker user that published it, where the publisher said (RabbitMQ refuses a user_id that is not the
    # publishing connection's user): what a consumer may trust about who sent it.
    user_id: str | None = None


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]

# Transport metadata, not part of any event's contract: a publisher marks messages that only renew what the
# consumer already knows (a holder's periodic refresh) so that a consumer may take them after everything else.
LANE_HEADER = "x-havip-lane"
ROUTINE_LANE = "routine"


def is_routine(message: AbstractIncomingMessage) -> bool:
    return message.headers.get(LANE_HEADER) == ROUTINE_LANE


class _Arrival(NamedTuple):
    message: AbstractIncomingMessage
    received_ns: int  # when it arrived (Delivery.received_ns)
    number: int  # in arrival order, across both lanes


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (rather than an awaited future of the AMQP library's,
    which it cancels when a connection closes)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settleable(message: AbstractIncomingMessage) -> bool:
    """Whether the channel the message came on is still open (its ack can reach the broker)."""
    try:
        message.channel  # noqa: B018 — aio-pika raises here once that channel is closed
    except ChannelInvalidStateError:
        return False
    return True


def is_broker_unavailable(exc: BaseException) -> bool:
    """A broker that cannot be used now — away, refusing this login or virtual host, or without the exchanges
    `migrate` declares (which an operator may fix on the broker's side while the service waits)."""
    return isinstance(exc, OSError | TimeoutError | aiormq.exceptions.AMQPError | NoBrokerNode | TopologyMissing)


def describe_broker_error(exc: BaseException, amqp_url: str, ca_file: str | None = None) -> str:
    """What is wrong, in an operator's words rather than the AMQP library's (each node's, for a cluster).
    `ca_file`: the CA an amqps:// node is verified against (HAVIP_AMQP_CA_FILE), named when it does not vouch
    for the node's certificate."""
    if isinstance(exc, NoBrokerNode):
        return "no RabbitMQ node can be used: " + "; ".join(
            describe_broker_error(e, u, ca_file) for u, e in exc.failures
        )
    if isinstance(exc, TopologyMissing | BrokerAccessRefused):
        return str(exc)  # already in words, naming the user, the virtual host and the resource
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"RabbitMQ refused a right the user needs ({RIGHTS_DOC}): {exc}"
    url = URL(amqp_url)
    where = f"RabbitMQ at {url.host}:{url.port}"
    user = url.user or "guest"
    tls = describe_tls_failure(exc, "RabbitMQ", f"{url.host}:{url.port}", ca_file)
    if tls is not None:
        return tls
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"{where} refused the login of user {user!r}: wrong user name or password"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closes the connection at Connection.Open: a virtual host it refuses this user.
        vhost = url.path[1:] or "/"
        return f"{where} has no virtual host {vhost!r}, or user {user!r} has no permission on it"
    if isinstance(exc, ConnectionRefusedError) or (isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED):
        return f"nothing accepts connections at {url.host}:{url.port} (is RabbitMQ running?)"
    if isinstance(exc, TimeoutError):
        return f"{where} did not answer in time"
    detail = exc.args[-1] if isinstance(exc, OSError) and exc.args else exc
    return f"{where} cannot be used: {detail}"


class _DropRetryNotices(logging.Filter):
    """The AMQP libraries' own line for each failed first attempt: aio-pika's reconnect notice, aiormq's
    "error when creating transport"."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Reconnecting after" not in message and "error when creating transport" not in message


@contextlib.contextmanager
def _quiet_reconnect_notices() -> Iterator[None]:
    """While Broker.connect retries (and says why, once), the libraries' line for every attempt only repeats it."""
    loggers = [logging.getLogger(name) for name in ("aio_pika.robust_connection", "aiormq.connection")]
    notices = _DropRetryNotices()
    for logger in loggers:
        logger.addFilter(notices)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notices)


def is_transient(exc: BaseException) -> bool:
    """Errors of the environment (a database or broker away, a timeout) rather than of the message."""
    return isinstance(exc, OSError | TimeoutError | aio_pika.exceptions.AMQPConnectionError)


class BrokerAccessRefused(StartupError):
    """RabbitMQ refused this process's broker user a right it needs (ACCESS_REFUSED), said in words: the user, the
    virtual host, what it was doing to which exchange or queue, and the right that takes. A service says it once
    and asks again (an operator may grant the right meanwhile: until_granted); `migrate` ends with it."""

    EXIT_CODE = 2

    def __init__(self, settings: CommonSettings, doing: str, needs: str, cause: BaseException) -> None:
        super().__init__(
            f"RabbitMQ refused to let user {settings.amqp_user!r} {doing} in virtual host "
            f"{settings.amqp_vhost!r}: that takes {needs}. Grant it ({RIGHTS_DOC}) or use a user that has it. "
            f"RabbitMQ said: {cause}",
            self.EXIT_CODE,
        )


class TopologyMissing(StartupError):
    """An exchange or queue that every process relies on is not there, and this process's user may not declare it
    (a service's own user: `migrate` declares them)."""

    def __init__(self, settings: CommonSettings, kind: str, name: str) -> None:
        super().__init__(
            f"RabbitMQ has no {kind} {name!r} in virtual host {settings.amqp_vhost!r}, and user "
            f"{settings.amqp_user!r} may not declare it: run `migrate` with a user that may declare the exchanges "
            f"and queues ({RIGHTS_DOC})",
            2,
        )


@contextlib.contextmanager
def _refused_as(settings: CommonSettings, doing: str, needs: str) -> Iterator[None]:
    """RabbitMQ's ACCESS_REFUSED for what the block does, as BrokerAccessRefused."""
    try:
        yield
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise BrokerAccessRefused(settings, doing, needs, exc) from exc


async def close_quietly(channel: AbstractChannel) -> None:
    """Close a channel whatever its state: a robust channel the broker closed (a refused right) reopens itself
    unless closed by us."""
    with contextlib.suppress(Exception):
        await channel.close()


async def declare_topology(channel: AbstractChannel, settings: CommonSettings) -> AbstractExchange:
    """Declare the event exchange and the dead-letter path; idempotent. A user that may not declare them (a
    service's own, which has no configure right on them: docs/operations.md) gets BrokerAccessRefused — and
    `channel` is closed; Broker.connect then only checks that they exist (check_topology)."""
    with _refused_as(settings, f"declare exchange {settings.exchange!r}", "configure on it"):
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx_name = settings.dead_letter_exchange
    with _refused_as(settings, f"declare exchange {dlx_name!r}", "configure on it"):
        dlx = await channel.declare_exchange(dlx_name, aio_pika.ExchangeType.TOPIC, durable=True)
    kind: dict[str, Any] | None = dict(QUORUM) if settings.quorum_queues else None
    dead_name = settings.dead_letter_queue
    try:
        with _refused_as(settings, f"declare queue {dead_name!r}", "configure on it"):
            dead = await channel.declare_queue(dead_name, durable=True, arguments=kind)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise QueueArgumentsDiffer(dead_name, settings.amqp_vhost, exc) from exc
    with _refused_as(
        settings,
        f"bind queue {dead_name!r} to exchange {dlx_name!r}",
        "write on the queue and read on the exchange",
    ):
        await dead.bind(dlx, routing_key="#")
    return exchange


async def check_topology(channel: AbstractChannel, settings: CommonSettings) -> AbstractExchange:
    """For a user that may not declare them: the event exchange and the dead-letter path exist (`migrate`
    declared them) — passive declarations, which take no right; TopologyMissing names the first one missing.
    Returns the event exchange on `channel`."""
    for kind, name in (("exchange", settings.exchange), ("exchange", settings.dead_letter_exchange)):
        try:
            checked = await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TopologyMissing(settings, kind, name) from exc
        if name == settings.exchange:
            exchange = checked
    try:
        await channel.declare_queue(settings.dead_letter_queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise TopologyMissing(settings, "queue", settings.dead_letter_queue) from exc
    return exchange


async def until_granted(attempt: Callable[[], Awaitable[T]], *, stop: asyncio.Event | None = None) -> T | None:
    """`attempt()`'s result (never None) once RabbitMQ grants the rights it takes: while it refuses one
    (BrokerAccessRefused) that is said once, in words, and asked again with back-off up to 30 s — an operator may
    grant it meanwhile, as a wrong password is waited out at the start; None if `stop` was set first."""
    said: list[str] = []

    def tell(state: RetryCallState) -> None:
        reason = str(failure_of(state))
        if said[-1:] != [reason]:
            log.error("%s; asking again with back-off (up to %.0f s) until it is granted", reason, WAIT_MAX_S)
            said.append(reason)

    retrying = retrying_with_backoff(
        retry=lambda exc: isinstance(exc, BrokerAccessRefused),
        initial_s=WAIT_INITIAL_S,
        max_s=WAIT_MAX_S,
        before_sleep=tell,
        stop=stop,
    )
    try:
        result: T = await retrying(attempt)
    except RetryError:  # stopped while refused
        return None
    if said:
        log.info("RabbitMQ granted what was refused: going on")
    return result


# A queue that one consumer at a time takes from (RabbitMQ's single active consumer): the others wait, registered,
# and the broker hands the queue to one of them as soon as the active one's channel or connection is gone. Only a
# quorum queue keeps that state through the loss of a broker node.
SINGLE_ACTIVE_CONSUMER = {"x-queue-type": "quorum", "x-single-active-consumer": True}
QUORUM = {"x-queue-type": "quorum"}
# A quorum queue dead-letters a message delivered this many times without an acknowledgement: one that makes
# every consumer it reaches crash (a process, not a handler's error, which BatchConsumer counts itself) stops
# going round. Every failover of a consumer redelivers what it held, so the limit leaves room for many.
DELIVERY_LIMIT = 20


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A consumer's queue as `migrate` declares it ahead of the service's first start (declare_consumer_queue)."""

    name: str
    routing_keys: tuple[str, ...]
    single_active: bool = False
    arguments: Mapping[str, Any] | None = None


class QueueArgumentsDiffer(StartupError):
    """The queue exists with other arguments than the ones asked for (RabbitMQ's PRECONDITION_FAILED)."""

    EXIT_CODE = 2

    def __init__(self, name: str, vhost: str, cause: BaseException) -> None:
        super().__init__(
            f"RabbitMQ already holds queue {name!r} (virtual host {vhost!r}) with other arguments than this "
            "version and configuration declare (a classic queue where a quorum queue is declared now: "
            "HAVIP_AMQP_QUEUE_TYPE, or a cluster named in HAVIP_AMQP_URL; or an older version's arguments). "
            "Stop every process of the service and run its `migrate`, which replaces the queue "
            "while it is empty and unused; if it holds messages, let the older version drain it first, or delete "
            f"the queue (rabbitmqctl delete_queue {name} -p {vhost}) — or point HAVIP_AMQP_URL at a new virtual "
            f"host. RabbitMQ said: {cause}",
            self.EXIT_CODE,
        )


async def declare_consumer_queue(
    channel: AbstractChannel,
    settings: CommonSettings,
    name: str,
    routing_keys: Iterable[str],
    *,
    single_active: bool = False,
    arguments: Mapping[str, Any] | None = None,
) -> AbstractQueue:
    """Declare a consumer's durable queue, bound to the event exchange (which exists: Broker.connect declared or
    checked it), dead-lettering to the DLX. With `single_active` it is a quorum queue with a single active consumer
    (SINGLE_ACTIVE_CONSUMER); `arguments` adds others (e.g. QUORUM); raises QueueArgumentsDiffer if the queue
    exists with other arguments, BrokerAccessRefused if the user may not declare or bind it."""
    arguments = {"x-dead-letter-exchange": settings.dead_letter_exchange, **(arguments or {})}
    if single_active:
        # No delivery limit here: these queues were quorum queues before there was one, and RabbitMQ 3.10 can
        # neither change a quorum queue's arguments nor delete one only if it is empty and unused (migrate's
        # way of replacing a queue). A policy gives them one (docs/operations.md).
        arguments |= SINGLE_ACTIVE_CONSUMER
    elif settings.quorum_queues:
        arguments |= QUORUM | {"x-delivery-limit": DELIVERY_LIMIT}
    full_name = settings.queue(name)
    # RabbitMQ checks a dead-letter exchange's right only as it creates the queue.
    needs = f"configure on it (and, to create it, read on it and write on {settings.dead_letter_exchange!r})"
    try:
        with _refused_as(settings, f"declare queue {full_name!r}", needs):
            queue = await channel.declare_queue(full_name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise QueueArgumentsDiffer(full_name, settings.amqp_vhost, exc) from exc
    for key in routing_keys:
        with _refused_as(
            settings,
            f"bind queue {full_name!r} to exchange {settings.exchange!r} with routing key {key!r}",
            "write on the queue and read on the exchange (and the key's read, if it has topic permissions there)",
        ):
            await queue.bind(settings.exchange, routing_key=key)
    return queue


RECONNECT_INTERVAL_S = 1.0


def broker_tls_context(settings: CommonSettings) -> ssl.SSLContext | None:
    """For amqps:// nodes: verifies each node's certificate chain against HAVIP_AMQP_CA_FILE (else the system's
    CAs) and its host name against the URL's, TLS 1.2 or later; None for amqp://."""
    if not settings.amqp_tls:
        return None
    return client_context(settings.amqp_ca_file)


def cluster_connection(
    settings: CommonSettings, source: str, first: int = 0, context: ssl.SSLContext | None = None
) -> ClusterConnection:
    """A ClusterConnection to the configured nodes, over TLS for amqps:// ones (`context`, else
    broker_tls_context's), named `source` on the broker."""
    return ClusterConnection(
        settings.amqp_urls,
        first,
        ssl_context=context or broker_tls_context(settings),
        client_properties={"connection_name": source},
        silent_node_down_s=settings.silent_node_down_s,
    )


PUBLISHES_NACKED = Counter(
    "havip_broker_publishes_nacked_total",
    "Publishes RabbitMQ refused (nack); each time the publishing channel is replaced by a new one",
    ["connection"],
)
BROKER_CONNECTED = Gauge(
    "havip_broker_connected",
    "1 while the process's connection to RabbitMQ (to one of the cluster's nodes) is up, 0 while it is away",
    ["connection"],
)


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection to one of several broker nodes: each attempt to connect — the first, and every one
    after the connection is lost — goes to the next node in turn, so that a process whose node died or froze
    moves to a live one (aio-pika's own robust connection only ever reconnects to its one URL).

    The turn is taken in RobustConnection's attempt to connect (its private `__connect_transport`), the one
    place every attempt goes through; tests/integration/test_broker_nodes.py pins that behaviour to the
    aio-pika version in requirements.lock."""

    def __init__(
        self, urls: Sequence[str], first: int = 0, *, silent_node_down_s: float | None = None, **kwargs: Any
    ) -> None:
        """`silent_node_down_s`: how long after a node's last word the others must have declared it down (None:
        reconnect at once)."""
        self._nodes = [make_url(url) for url in urls]
        self._silent_node_down_s = silent_node_down_s
        self._next = first % len(self._nodes)
        if len(self._nodes) > 1 and "reconnect_interval" not in self._nodes[0].query:
            # aio-pika waits this long after a failed attempt (5 s by default) before the next: with other nodes
            # to try, sooner.
            kwargs.setdefault("reconnect_interval", RECONNECT_INTERVAL_S)
        super().__init__(self._nodes[self._next], **kwargs)

    async def _RobustConnection__connect_transport(self) -> None:
        await self._until_silent_node_down()
        self.url = self._nodes[self._next]
        self._next = (self._next + 1) % len(self._nodes)
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]

    async def _until_silent_node_down(self) -> None:
        """After a connection dropped because its node stopped answering (aiormq: no frame for three heartbeats):
        wait until the other nodes must have declared that node down, counted from its last frame. A quorum queue
        it led holds a new connection's publishes and consumers until then (RabbitMQ 3.10: its record still names
        the lost leader), and for seconds after; one connected once the node is down is served at once."""
        lost = self.transport
        if lost is None or self._silent_node_down_s is None:
            return
        connection = lost.connection
        if not getattr(connection, "is_connection_was_stuck", False):
            return  # closed or reset: a node that died, or was stopped, is known down at once
        # aiormq's own record of the last frame (loop time), else its grace: three heartbeats and one.
        last_frame = getattr(connection, "_Connection__last_frame_time", None)
        if not isinstance(last_frame, float):
            last_frame = asyncio.get_running_loop().time() - 3 * (getattr(connection, "heartbeat_timeout", 0) + 1)
        wait = last_frame + self._silent_node_down_s - asyncio.get_running_loop().time()
        if wait > 0:
            log.warning(
                "RabbitMQ node %s stopped answering: connecting to another in %.1f s, once the cluster has "
                "declared it down",
                self.node,
                wait,
            )
            await asyncio.sleep(wait)

    @property
    def node(self) -> str:
        """host:port of the node this connection goes (or last went) to."""
        return f"{self.url.host}:{self.url.port}"


class NoBrokerNode(Exception):
    """None of a cluster's nodes could be used; `failures` holds each node's URL and error."""

    def __init__(self, failures: Sequence[tuple[str, BaseException]]) -> None:
        super().__init__("; ".join(f"{URL(url).host}:{URL(url).port}: {exc!r}" for url, exc in failures))
        self.failures = list(failures)


class PublishingChannelReplaced(ConnectionError):
    """The publish waited for its confirm on a channel that the Broker replaced (another publish on it was nacked
    or timed out): try it again."""

    def __init__(self) -> None:
        super().__init__("the publishing channel was replaced before RabbitMQ confirmed this publish")


class _BrokerAway(Exception):
    """A consuming channel could not be opened: the broker is away, or the robust connection reconnecting."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# RabbitMQ declares a silent node down within 1.25 × net_ticktime (60 s by default, 10 s in docs/operations.md).
RETIRED_CHANNEL_CLOSE_AFTER_S = 90.0
# Replaced publishing channels left open at most (Broker._retire).
MAX_RETIRED_CHANNELS = 8


class Broker:
    """The process's connection to RabbitMQ."""

    # How long a replaced publishing channel is kept open (_retire): well past a cluster's net_ticktime.
    retired_channel_close_after_s = RETIRED_CHANNEL_CLOSE_AFTER_S

    def __init__(self, settings: CommonSettings, source: str, *, first_node: int | None = None) -> None:
        """`first_node`: the index of the node in settings.amqp_urls tried first; by default one at random, so that
        a deployment's processes spread over the nodes."""
        self.settings = settings
        self.source = source
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self.connect_attempts = 0
        self._first_node = random.randrange(len(settings.amqp_urls)) if first_node is None else first_node
        self._user = settings.amqp_user
        self._checks_topology = False  # its user may not declare the exchanges (said once)
        self._replacing = asyncio.Lock()
        self._publishing: AbstractChannel | None = None
        self._retired: set[asyncio.Task[None]] = set()  # closing replaced publishing channels (_retire)
        self._usable = asyncio.Event()  # connected, and its channels restored after a reconnection
        self._tls = broker_tls_context(settings)  # one context for every connection (its CAs read once)

    async def connect(self, stop: asyncio.Event | None = None, *, max_delay_s: float = WAIT_MAX_S) -> bool:
        """Connect at start-up, for as long as it takes (False: `stop` was set first); later reconnects are the
        robust connection's job. What is wrong is said once, in words (a wrong password, an unknown virtual
        host, nothing listening), as every dependency's wait does (shared.backoff)."""
        with _quiet_reconnect_notices():
            connected = await wait_until_available(
                self._open,
                what="RabbitMQ",
                unavailable=is_broker_unavailable,
                describe=lambda exc: describe_broker_error(exc, self.settings.amqp_urls[0], self._ca_file),
                stop=stop,
                max_delay_s=max_delay_s,
                logger=log,
            )
        return connected is not None

    async def _open(self) -> bool:
        """One try of every node, from a different one at each call (the processes of a deployment spread
        over the nodes); raises the one node's error, or NoBrokerNode with every node's."""
        self.connect_attempts += 1
        urls = self.settings.amqp_urls
        failures: list[tuple[str, BaseException]] = []
        for turn in range(len(urls)):
            first = (self._first_node + turn) % len(urls)
            # connect_robust, unrolled: a failed attempt's connection is closed here, not left to the collector
            # (whose close() may find no loop to run on: "coroutine 'RobustConnection.close' was never awaited").
            connection = cluster_connection(self.settings, self.source, first, self._tls)
            try:
                await connection.connect()
                self._publishing, self._exchange = await self._topology(connection)
            except Exception as failed:
                with contextlib.suppress(Exception):
                    await connection.close()
                exc = await self._named(failed, urls[first])
                if len(urls) == 1 or not is_broker_unavailable(exc):
                    if exc is failed:
                        raise
                    raise exc from failed
                failures.append((urls[first], exc))
                continue
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            self._first_node = first + 1
            self._connection = connection
            self._usable.set()
            connection.close_callbacks.add(lambda *_: self._usable.clear())
            connection.reconnect_callbacks.add(lambda *_: self._usable.set())
            BROKER_CONNECTED.labels(self.source).set_function(connection.connected.is_set)
            if len(urls) > 1:
                log.info("connected to RabbitMQ node %s", connection.node)
            return True
        self._first_node += 1
        raise NoBrokerNode(sorted(failures, key=lambda failure: urls.index(failure[0])))  # said the same each time

    @property
    def _ca_file(self) -> str | None:
        return None if self.settings.amqp_ca_file is None else str(self.settings.amqp_ca_file)

    async def _named(self, exc: Exception, url: str) -> Exception:
        """A certificate for other host names than the node's, as CertificateNotForHost naming them."""
        if self._tls is None:
            return exc
        node = URL(url)
        named = await naming_the_certificate(exc, node.host, node.port, self._tls)
        return named if isinstance(named, Exception) else exc

    async def _topology(self, connection: AbstractRobustConnection) -> tuple[AbstractChannel, AbstractExchange]:
        """A publishing channel and the event exchange on it: the exchanges and the dead-letter queue declared,
        or — for a user that may not declare them (a service's own: docs/operations.md) — checked, as `migrate`
        declared them."""
        if not self._checks_topology:
            channel = await connection.channel(publisher_confirms=True)
            try:
                return channel, await declare_topology(channel, self.settings)
            except BrokerAccessRefused:
                await close_quietly(channel)  # the broker closed it; a robust channel would reopen
            self._checks_topology = True
            log.info(
                "user %r may not declare the exchanges: checking that they exist",
                self.settings.amqp_user,
                extra={"exchange": self.settings.exchange},
            )
        channel = await connection.channel(publisher_confirms=True)
        return channel, await check_topology(channel, self.settings)

    async def _publishing_channel(self) -> tuple[AbstractChannel, AbstractExchange]:
        """A new publishing channel on the connection, with the event exchange it publishes to — not declared
        again: connect() did, and a declaration (the dead-letter queue's binding) waits on the cluster's metadata,
        which a node frozen and not yet declared down holds up."""
        channel = await self.connection.channel(publisher_confirms=True)
        return channel, await channel.get_exchange(self.settings.exchange, ensure=False)

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less while the connection is away: until it is back, its channels restored — a
        retry's wait (shared.backoff), so that what failed while the broker was away is tried again at once."""
        if self._connection is None or self._usable.is_set():
            await asyncio.sleep(seconds)
            return
        await interruptible_sleep(self._usable)(seconds)

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("Broker.connect() was not called")
        return self._connection

    async def publish(self, env: Envelope, *, routing_key: str | None = None, routine: bool = False) -> None:
        """Publish one event and wait for the broker's confirm (bounded by the publish timeout). A claims event
        goes to its claims' partition (shared.partitions) unless a routing key is given; `routine`: as in
        publish_encoded."""
        if routing_key is None and env.type == CLAIMS_EVENT:
            routing_key = claims_routing_key(self._partition_of(env.data))
        await self.publish_encoded(
            env.type, encode(env), env.event_id, env.occurred_at, routing_key=routing_key, routine=routine
        )

    def _partition_of(self, data: dict[str, Any]) -> int:
        claims = data.get("claims") or ()
        partitions = {partition_of(IPv4Address(str(c["sender_ip"])), self.settings.partitions) for c in claims}
        if len(partitions) > 1:
            raise ValueError("a claims event carries the claims of one partition: publish one per partition")
        return partitions.pop() if partitions else 0

    async def publish_encoded(
        self,
        event_type: str,
        body: bytes,
        event_id: uuid.UUID,
        occurred_at: datetime | None = None,
        *,
        routine: bool = False,
        routing_key: str | None = None,
    ) -> None:
        """Publish an envelope already encoded (hot paths encode without pydantic) and wait for its confirm;
        `routine` marks it for a consumer's routine lane (LANE_HEADER); the routing key is the event's type
        unless given (a partition's claims: shared.partitions)."""
        if self._exchange is None:
            raise RuntimeError("Broker.connect() was not called")
        message = aio_pika.Message(
            body=body,
            headers={LANE_HEADER: ROUTINE_LANE} if routine else None,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(event_id),
            type=event_type,
            timestamp=occurred_at,
            app_id=self.source,
            user_id=self._user,  # checked by RabbitMQ against this connection's user: consumers may rely on it
        )
        key = routing_key or event_type
        exchange = self._exchange
        try:
            # mandatory=False: an event nobody subscribes to is not an error for the publisher.
            await exchange.publish(
                message, routing_key=key, mandatory=False, timeout=self.settings.publish_timeout
            )
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise BrokerAccessRefused(
                self.settings,
                f"publish to exchange {self.settings.exchange!r} with routing key {key!r}",
                "write on the exchange (and the key's write, if it has topic permissions there)",
                exc,
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            if not isinstance(exc, aiormq.exceptions.PublishError):  # a nack, not a returned message
                PUBLISHES_NACKED.labels(self.source).inc()
                await self._replace_publishing_channel(exchange, "was refused (nack)")
            raise
        except TimeoutError:
            await self._replace_publishing_channel(
                exchange, f"was not confirmed within {self.settings.publish_timeout:g} s"
            )
            raise
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            # aiormq cancels the confirms it waits for when the connection closes under them: to the caller that
            # is a lost connection (retried), not a cancellation of its own task (which would end it).
            raise ConnectionError("the connection closed before RabbitMQ confirmed the publish") from exc

    async def _replace_publishing_channel(self, failed: AbstractExchange, why: str) -> None:
        """RabbitMQ (3.10) nacks, or never confirms, every publish of a channel whose first publish to a quorum
        queue came while the queue's leader was lost (its node dead, or frozen and not yet declared down), for as
        long as the channel lives: after a nack or a publish timeout the channel is replaced by a new one, so that
        the caller's next try can succeed. Once per channel, however many publishes failed on it."""
        async with self._replacing:
            if self._exchange is not failed:
                return  # another publish replaced it already
            if len(self._retired) >= MAX_RETIRED_CHANNELS:
                return  # publishes keep failing on new channels too (a broker that blocks publishers): no more
            old = self._publishing
            try:
                async with asyncio.timeout(self.settings.publish_timeout):
                    self._publishing, self._exchange = await self._publishing_channel()
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise
                log.warning("no new publishing channel (the connection closed meanwhile): the next publish tries")
                return
            except Exception as exc:  # the broker away again: the next nack or publish tries again
                log.warning("no new publishing channel (%r): the next publish tries again", exc)
                return
            log.warning("a publish %s: publishing on a new channel", why)
            if old is not None:
                await self._retire(old)

    async def _retire(self, channel: AbstractChannel) -> None:
        """A replaced publishing channel: the publishes still waiting on it for a confirm are failed at once,
        to be tried again on the new channel (the replaced one may never confirm them); the channel is closed
        later, not now: RabbitMQ answers the Channel.Close of a channel that met a quorum queue's lost leader only
        once the cluster has settled (the node declared down), and aiormq, given no answer within a heartbeat,
        closes the whole connection, every consumer's channel with it."""
        with contextlib.suppress(Exception):  # a channel closed meanwhile failed its publishes itself
            pending: dict[int, object] = getattr(await channel.get_underlay_channel(), "confirmations", {})
            for confirmation in list(pending.values()):
                if isinstance(confirmation, asyncio.Future) and not confirmation.done():
                    confirmation.set_exception(PublishingChannelReplaced())

        async def close_later() -> None:
            await asyncio.sleep(self.retired_channel_close_after_s)
            with contextlib.suppress(Exception):
                await channel.close()

        closing = asyncio.create_task(close_later(), name="closing a replaced publishing channel")
        self._retired.add(closing)
        closing.add_done_callback(self._retired.discard)

    async def publish_many(self, envs: Sequence[Envelope]) -> None:
        """Publish with all confirms in flight at once; raises if any was not confirmed."""
        await asyncio.gather(*(self.publish(env) for env in envs))

    async def consumer(
        self,
        queue: str,
        routing_keys: Iterable[str],
        handler: BatchHandler,
        *,
        prefetch: int = 500,
        max_batch: int = 500,
        max_attempts: int = 5,
        transient: Callable[[BaseException], bool] = is_transient,
        routine_batch: int | None = None,
        routine_handler: BatchHandler | None = None,
        single_active: bool = False,
        arguments: Mapping[str, Any] | None = None,
        on_channel_closed: Callable[[], None] = lambda: None,
    ) -> BatchConsumer:
        """Consume `queue` on a channel of its own; returns once the consumer is registered. With `single_active`
        the queue is a quorum queue with a single active consumer (declare_consumer_queue): every process of the
        service registers, RabbitMQ delivers to one of them, and to a waiting one once that one's channel is
        gone — a consumer learns it is the active one from its first delivery. `on_channel_closed` is called
        once each time the consumer's channel is lost (the robust connection reopens it and registers the
        consumer again, waiting behind whichever took over meanwhile)."""
        name = self.settings.queue(queue)
        away = False

        async def consume() -> BatchConsumer:
            channel: AbstractChannel | None = None
            try:
                channel = await self.connection.channel()
                await channel.set_qos(prefetch_count=prefetch)
                amqp_queue = await declare_consumer_queue(
                    channel, self.settings, queue, routing_keys, single_active=single_active, arguments=arguments
                )
            except QueueArgumentsDiffer:
                raise
            except BrokerAccessRefused:
                if channel is not None:
                    await close_quietly(channel)  # else reopened by the robust connection, and refused again
                raise
            except Exception as exc:
                if is_broker_unavailable(exc) or isinstance(exc, RuntimeError | ChannelInvalidStateError):
                    raise _BrokerAway(exc) from exc
                raise
            consumer = BatchConsumer(
                amqp_queue,
                handler,
                max_batch=max_batch,
                max_attempts=max_attempts,
                transient=transient,
                routine_batch=routine_batch,
                routine_handler=routine_handler,
                on_channel_closed=on_channel_closed,
            )
            try:
                with _refused_as(self.settings, f"consume from queue {name!r}", "read on it"):
                    await consumer.start()
            except BrokerAccessRefused:
                await close_quietly(channel)
                raise
            return consumer

        def tell(state: RetryCallState) -> None:
            nonlocal away
            exc = failure_of(state)
            if isinstance(exc, _BrokerAway) and not away:  # the robust connection is reconnecting
                log.warning("cannot consume %s while RabbitMQ is away (%s); asking again", name, exc.cause)
                away = True

        retrying = retrying_with_backoff(
            retry=lambda exc: isinstance(exc, _BrokerAway), initial_s=0.1, max_s=2.0, before_sleep=tell
        )

        async def consume_while_away() -> BatchConsumer:
            consumer: BatchConsumer = await retrying(consume)
            return consumer

        # A right the user lacks (declaring, binding or reading the queue) is said once and asked again, slower.
        consumer = await until_granted(consume_while_away)
        assert consumer is not None  # no stop event: only a consumer or an exception ends the wait
        if away:
            log.info("consuming %s again", name)
        return consumer

    async def close(self) -> None:
        for closing in list(self._retired):
            closing.cancel()  # the connection's close closes them
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


class BatchConsumer:
    """Hands deliveries to the handler in arrival order, in batches of what has already arrived.

    Messages are acknowledged only after the handler returned (its work is committed). A message that cannot
    be decoded, or that the handler refuses with InvalidEvent, is rejected to the dead-letter exchange and the
    consumer goes on. A transient handler error is retried with back-off for as long as it lasts, the messages
    held unacknowledged; any other error a bounded number of times, then the batch is isolated message by
    message and the one at fault dead-lettered.

    With `routine_batch` set, messages marked routine (LANE_HEADER) take a lane of their own: they are handled
    in batches of at most that many messages, by a second task and `routine_handler` (default: `handler`), so
    that a routine batch under way never holds up the other messages (the handlers must then accept calls at
    the same time). Order holds within each lane, and a routine message is handled only after every other
    message delivered before it: a renewal never overtakes an older change (after a backlog, a holder's later
    refresh decided first would make the changes of holder captured before it stale).
    """

    def __init__(
        self,
        queue: AbstractQueue,
        handler: BatchHandler,
        *,
        max_batch: int,
        max_attempts: int = 5,
        transient: Callable[[BaseException], bool] = is_transient,
        routine_batch: int | None = None,
        routine_handler: BatchHandler | None = None,
        on_channel_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue = queue
        self._on_channel_closed = on_channel_closed
        self._handler = handler
        self._routine_handler = routine_handler or handler
        self._max_batch = max_batch
        self._max_attempts = max_attempts
        self._transient = transient
        self._routine_batch = routine_batch
        # aio-pika runs one callback task per message; putting without awaiting keeps arrival order. Each message
        # waits with the time it arrived (Delivery.received_ns).
        self._inbox: asyncio.Queue[_Arrival] = asyncio.Queue()
        self._routine: asyncio.Queue[_Arrival] = asyncio.Queue()
        # Arrival numbers of the main lane's messages not yet handled, oldest first (the lane handles in order);
        # a routine batch waits until none older than its newest message is left.
        self._arrivals = itertools.count()
        self._unhandled: collections.deque[int] = collections.deque()
        self._main_lane_moved = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0  # batches under way
        self._idle = asyncio.Event()
        self._stopping = False
        self.dead_lettered = 0
        self._channel_open = True
        self._consuming = False  # set once the broker accepted the consumer
        self._closing: asyncio.Future[None] | None = None

    async def start(self) -> None:
        channel = self._queue.channel
        channel.close_callbacks.add(self._channel_closed)
        if isinstance(channel, AbstractRobustChannel):  # reopened (and the consumer registered again) on reconnect
            channel.reopen_callbacks.add(self._channel_reopened)
        try:
            await self._queue.consume(self._on_message)
        except BaseException:
            self._stopping = True  # it never consumed: what becomes of its channel now is nobody's pause
            raise
        self._consuming = True
        name = f"consume {self._queue.name}"
        self._tasks.append(asyncio.create_task(self._run(self._inbox, self._max_batch, self._handler), name=name))
        if self._routine_batch is not None:
            lane = self._run(self._routine, self._routine_batch, self._routine_handler)
            self._tasks.append(asyncio.create_task(lane, name=f"{name} (routine)"))

    def _channel_reopened(self, *_args: object) -> None:
        if self._stopping:
            # Reopened by the robust connection after this consumer was stopped (its close came while the channel
            # was away): closed again, so that a consumer nobody runs holds no queue.
            self._closing = asyncio.ensure_future(self._queue.channel.close())
            return
        self._channel_open = True

    def _channel_closed(self, _sender: object = None, exc: BaseException | None = None, *_args: object) -> None:
        if not self._consuming and isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return  # the consume itself was refused (no read right): its caller says so; nothing was paused
        # Told once per loss: the robust connection's failed attempts to reopen the channel call this again.
        if self._stopping or not self._channel_open:
            return
        self._channel_open = False
        # What arrived on that channel and waits here can no longer be acknowledged: RabbitMQ delivers it again,
        # to whichever consumer is active then.
        for inbox in (self._inbox, self._routine):
            while not inbox.empty():
                inbox.get_nowait()
        self._unhandled.clear()
        self._main_lane_moved.set()
        log.warning("consuming %s paused: its channel closed (RabbitMQ away, or the channel failed)", self.name)
        self._on_channel_closed()

    @property
    def name(self) -> str:
        return self._queue.name

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # left unacknowledged: RabbitMQ delivers it again once this channel is closed
        arrived = _Arrival(message, time.time_ns(), next(self._arrivals))
        if self._routine_batch is not None and is_routine(message):
            self._routine.put_nowait(arrived)
        else:
            self._unhandled.append(arrived.number)
            self._inbox.put_nowait(arrived)

    @property
    def pending(self) -> int:
        """Messages received and not yet handled, and batches under way."""
        return self._inbox.qsize() + self._routine.qsize() + self._busy

    async def until_idle(self, timeout_s: float = 1.0) -> None:
        """Wait (at most `timeout_s`) until everything received so far is handled."""
        deadline = time.monotonic() + timeout_s
        while self.pending and not self._stopping:
            self._idle.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(remaining, 0.05))

    async def until_drained(self, timeout_s: float = 1.0) -> None:
        """Wait (at most `timeout_s`) until the queue holds nothing ready for this consumer and everything it
        received is handled: whatever was in the queue when this was called has then been handled (bar the
        messages on the wire at that moment, which the broker had already handed to this consumer)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stopping:
            try:
                declared = await self._queue.channel.declare_queue(self._queue.name, passive=True)
                ready = declared.declaration_result.message_count or 0
            except Exception:
                return
            if not ready and not self.pending:
                return
            await self.until_idle(max(0.0, min(deadline - time.monotonic(), 0.02)))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop consuming; a batch under way may finish (and be acknowledged) within `grace_s`."""
        self._stopping = True
        if self._busy:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await cancel(task)
        self._tasks = []
        # Closing the channel cancels the consumer: RabbitMQ hands a single-active-consumer queue to the next one
        # at once, and gives what this one held but did not acknowledge to it.
        # Closed even if the broker closed it already: a robust channel closed by us is never reopened, so the
        # robust connection does not register this consumer again after a reconnect (a consumer whose batches
        # nobody runs, holding a single-active-consumer queue).
        with contextlib.suppress(Exception):
            await self._queue.channel.close()

    async def _run(self, inbox: asyncio.Queue[_Arrival], max_batch: int, handler: BatchHandler) -> None:
        routine = inbox is self._routine
        while not self._stopping:
            batch = [await inbox.get()]
            while len(batch) < max_batch and not inbox.empty():
                batch.append(inbox.get_nowait())
            self._busy += 1
            try:
                if routine:
                    await self._after_older_messages(batch[-1].number)
                settleable = [arrived for arrived in batch if _settleable(arrived.message)]
                if settleable:
                    await self._process(settleable, handler)
            finally:
                if not routine:
                    self._handled_up_to(batch[-1].number)
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _after_older_messages(self, number: int) -> None:
        """Wait until the main lane has handled every message that arrived before message `number`."""
        while self._unhandled and self._unhandled[0] < number:
            self._main_lane_moved.clear()
            await self._main_lane_moved.wait()

    def _handled_up_to(self, number: int) -> None:
        # Whatever became of them (handled, dead-lettered, left on a closed channel), they no longer wait.
        while self._unhandled and self._unhandled[0] <= number:
            self._unhandled.popleft()
        self._main_lane_moved.set()

    async def _process(self, messages: list[_Arrival], handler: BatchHandler) -> None:
        good: list[tuple[AbstractIncomingMessage, Delivery]] = []
        for message, received_ns, _number in messages:
            try:
                env, data = decode(message.body)
            except InvalidEvent as exc:
                await self._dead_letter(message, str(exc))
                continue
            good.append((message, Delivery(env, data, bool(message.redelivered), received_ns, message.user_id)))
        if not good:
            return
        try:
            await self._handle_with_retry(handler, [d for _, d in good])
        except InvalidEvent:
            # Isolate the poison message: handle one by one.
            for message, delivery in good:
                try:
                    await self._handle_with_retry(handler, [delivery])
                except InvalidEvent as exc:
                    await self._dead_letter(message, str(exc))
                else:
                    await self._settle(message.ack())
            return
        if self._routine_batch is None:
            # Every earlier message of this channel is settled, so one multiple-ack covers the batch.
            await self._settle(good[-1][0].ack(multiple=True))
        else:
            # Two lanes settle out of delivery order: each message on its own.
            for message, _ in good:
                await self._settle(message.ack())

    async def _handle_with_retry(self, handler: BatchHandler, deliveries: list[Delivery]) -> None:
        """Retry a transient failure (the database or the network away) for as long as it lasts; any other
        failure `max_attempts` times at most, then refuse the batch as InvalidEvent: its messages are tried one
        by one and the one that keeps failing is dead-lettered instead of holding every message behind it."""
        failures = 0  # of the kind that is the message's fault

        def enough(state: RetryCallState) -> bool:
            nonlocal failures
            exc = failure_of(state)
            if exc is not None and not self._transient(exc):
                failures += 1
            return failures >= self._max_attempts

        def tell(state: RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.error("handler failed; retrying in %.1f s", delay, exc_info=failure_of(state))

        def retrying() -> AsyncRetrying:
            return retrying_with_backoff(
                retry=lambda exc: not isinstance(exc, InvalidEvent),
                initial_s=0.1,
                max_s=5.0,
                before_sleep=tell,
                stop_on=enough,
            )

        try:
            await at_once_then_retrying(lambda: handler(deliveries), retrying)
        except RetryError as gave_up:
            exc = gave_up.last_attempt.exception()
            raise InvalidEvent(f"handler failed {failures} times: {exc!r}") from exc

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        log.error("dead-lettering message %s: %s", message.message_id, reason)
        self.dead_lettered += 1
        await self._settle(message.reject(requeue=False))

    @staticmethod
    async def _settle(action: Awaitable[None]) -> None:
        # After a reconnect the old channel is gone, or the connection died under the ack (its broker node
        # killed): the broker redelivers those messages, and the handlers are idempotent, so a lost ack only
        # costs a repeat — never the consumer's task.
        try:
            await action
        except (ChannelInvalidStateError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            log.warning("could not settle message on a closed channel or connection: %r", exc)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            log.warning("could not settle message: its connection closed under the acknowledgement")
