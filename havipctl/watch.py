"""`havipctl watch`: the live event stream (docs/contract.md#events) from RabbitMQ.

The watcher declares its own exclusive, auto-delete, server-named queue bound to the event exchange
(`havip.events`, prefixed with HAVIP_AMQP_PREFIX: the documented naming rule of the deployment) with the
routing keys given (`#` = every event), consumes without acknowledgements (nothing is taken from anyone:
each queue on a topic exchange gets its own copy), and hands every message body to a callback. The queue goes
with the connection.

It stops on SIGINT/SIGTERM, after `count` events, or when `timeout` seconds (counted from the start, connecting
included) have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractQueue
from aio_pika.exceptions import AMQPError, ProbableAuthenticationError
from aiormq.exceptions import InvalidFrameError

from havipctl.client import display_url, ssl_error_in, tls_context
from havipctl.config import DEFAULT_AMQP_URL
from havipctl.errors import (
    BROKER_CA,
    AuthenticationFailed,
    Unreachable,
    UsageError,
    certificate_problem,
    tls_problem,
)

ALL_EVENTS = "#"
EXCHANGE = "havip.events"  # the one durable topic exchange of every event (docs/contract.md#events)

# Handed the body and the routing key of each message; returns whether it counts as an event shown.
Emit = Callable[[bytes, str], bool]


def exchange_name(prefix: str) -> str:
    """The event exchange's name for a HAVIP_AMQP_PREFIX: the prefix, then `havip.events` (README,
    Configuration). A rule of the public contract, restated here rather than imported from the services'
    settings; tests/unit/test_havipctl_cli.py checks that both agree."""
    return f"{prefix}{EXCHANGE}"


class Outcome(Enum):
    COUNT_REACHED = "count"
    STOPPED = "stopped"  # a signal
    TIMED_OUT = "timeout"


@dataclass(frozen=True, slots=True)
class WatchOptions:
    amqp_urls: Sequence[str] = (DEFAULT_AMQP_URL,)  # a cluster's nodes, tried in turn until one answers
    amqp_ca_file: str | None = None  # amqps:// nodes verified against it, else against the system's CAs
    exchange: str = EXCHANGE
    routing_keys: Sequence[str] = (ALL_EVENTS,)
    count: int | None = None
    timeout: float | None = None
    connect_timeout: float = 5.0


@dataclass(slots=True)
class WatchResult:
    outcome: Outcome
    received: int


@dataclass(slots=True)
class _Progress:
    received: int = 0


def _reason(exc: BaseException) -> str:
    """A short reason: the errno's text, or the broker's reply text (e.g. `NOT_ALLOWED - vhost x not found`)."""
    for arg in exc.args:
        reply_text = getattr(arg, "reply_text", None)
        if isinstance(reply_text, str) and reply_text:
            return reply_text
    if exc.args and isinstance(exc.args[0], int) and len(exc.args) > 1:
        code = exc.args[0]
        if code == errno.ECONNREFUSED:
            return "connection refused"
        with contextlib.suppress(ValueError):
            if 0 < code < 300:  # an errno; AMQP reply codes start at 311
                return os.strerror(code).lower()
        return " ".join(str(exc.args[1]).split())
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _quiet_libraries() -> None:
    """aiormq logs connection failures (with tracebacks) itself; havipctl reports them in one line instead."""
    for name in ("aiormq", "aio_pika", "pamqp", "asyncio"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


async def _connect(options: WatchOptions) -> tuple[AbstractConnection, str]:
    """The first node of `amqp_urls` that accepts the connection, and its URL. A node that cannot be reached is
    passed over for the next; a refused login, a wrong virtual host or a bad URL is said at once (the next node
    would say the same). When no node answers, each node's reason is said."""
    unreachable: list[str] = []
    for url in options.amqp_urls:
        try:
            return await _connect_to(url, options), url
        except Unreachable as exc:
            if len(options.amqp_urls) == 1:
                raise
            unreachable.append(str(exc).removeprefix("cannot reach RabbitMQ at "))
    raise Unreachable(f"cannot reach any of the {len(unreachable)} RabbitMQ nodes: {'; '.join(unreachable)}")


async def _connect_to(url: str, options: WatchOptions) -> AbstractConnection:
    where = display_url(url)
    context = tls_context(options.amqp_ca_file) if urlsplit(url).scheme == "amqps" else None
    try:
        return await aio_pika.connect(
            url,
            timeout=options.connect_timeout,
            ssl_context=context,
            client_properties={"connection_name": "havipctl watch"},
        )
    except ProbableAuthenticationError:
        raise AuthenticationFailed(
            f"RabbitMQ at {where} refused the login: check HAVIP_AMQP_URL / --amqp-url"
        ) from None
    except TimeoutError:
        raise Unreachable(
            f"cannot reach RabbitMQ at {where}: no answer within {options.connect_timeout:g} s"
        ) from None
    except InvalidFrameError as exc:
        # aiormq's answer when the broker closes the connection at Connection.Open: a vhost it refuses.
        reason = _reason(exc)
        if "Connection.Close" in reason:
            vhost = unquote(urlsplit(url).path[1:]) or "/"
            reason = f"the broker closed the connection: unknown virtual host {vhost!r}, or no permission on it"
        raise Unreachable(f"cannot reach RabbitMQ at {where}: {reason}") from None
    except (AMQPError, OSError) as exc:
        tls_error = ssl_error_in(exc)  # aiormq wraps it in an AMQPConnectionError
        if isinstance(tls_error, ssl.SSLCertVerificationError):
            host = urlsplit(url).hostname or ""
            reason = certificate_problem(tls_error, host=host, ca_file=options.amqp_ca_file, give_ca=BROKER_CA)
        elif tls_error is not None:
            reason = tls_problem(tls_error)
        else:
            reason = _reason(exc)
        raise Unreachable(f"cannot reach RabbitMQ at {where}: {reason}") from None
    except ValueError as exc:  # a URL that is not amqp://
        raise UsageError(f"invalid RabbitMQ URL {where!r}: {_reason(exc)}") from None


async def _declare(connection: AbstractConnection, options: WatchOptions) -> AbstractQueue:
    channel = await connection.channel()
    # The same declaration as the services' (shared.messaging.declare_topology): durable topic, idempotent.
    exchange = await channel.declare_exchange(options.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for key in options.routing_keys:
        await queue.bind(exchange, routing_key=key)
    return queue


async def _session(options: WatchOptions, emit: Emit, ready: Callable[[str], None], progress: _Progress) -> None:
    connection, url = await _connect(options)
    where = display_url(url)
    try:
        try:
            queue = await _declare(connection, options)
        except (AMQPError, OSError) as exc:
            raise Unreachable(f"RabbitMQ at {where} refused the watch queue: {_reason(exc)}") from None
        ready(f"watching {options.exchange} on {where} for {', '.join(options.routing_keys)}")
        try:
            async with queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    if emit(message.body, message.routing_key or ""):
                        progress.received += 1
                        if options.count is not None and progress.received >= options.count:
                            return
        except BrokenPipeError:  # our stdout closed (`havipctl watch | head`): not the broker's fault
            raise
        except (AMQPError, OSError) as exc:
            raise Unreachable(f"lost the connection to RabbitMQ at {where}: {_reason(exc)}") from None
        raise Unreachable(f"lost the connection to RabbitMQ at {where}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), timeout=2.0)


async def watch(options: WatchOptions, emit: Emit, ready: Callable[[str], None]) -> WatchResult:
    """Stream until count, timeout or a signal; raises Unreachable / AuthenticationFailed / UsageError."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    progress = _Progress()
    session = asyncio.create_task(_session(options, emit, ready, progress), name="havipctl watch")
    stopper = asyncio.create_task(stop.wait(), name="havipctl watch stop")
    try:
        done, _ = await asyncio.wait(
            {session, stopper}, timeout=options.timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        for task in (session, stopper):
            task.cancel()
        await asyncio.wait({session, stopper}, timeout=5.0)
    if session in done and not session.cancelled():
        session.result()  # raises what ended it early
        return WatchResult(Outcome.COUNT_REACHED, progress.received)
    if stopper in done:
        return WatchResult(Outcome.STOPPED, progress.received)
    return WatchResult(Outcome.TIMED_OUT, progress.received)


def run(options: WatchOptions, emit: Emit, ready: Callable[[str], None]) -> WatchResult:
    _quiet_libraries()
    return asyncio.run(watch(options, emit, ready))
