"""Composition root of the ARP watcher: `python -m services.arp_watcher`.

Capture starts first (claims are buffered), then RabbitMQ is connected — retried for as long as it takes — and
the publishing loop runs until SIGTERM/SIGINT. On stop: the capture thread ends, what is buffered is published
within `drain_timeout_s`, the connection is closed.

Exit codes: 0 clean stop; 1 runtime failure (capture thread died, socket could not be set up for a reason of
the environment); 2 invalid configuration (settings, unknown interface or namespace, metrics port taken).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry
from pydantic import ValidationError

from shared.heap import freeze_startup_heap
from shared.logging import configure_logging
from shared.messaging import Broker
from shared.metrics import serve_metrics
from shared.periodic import run_periodically
from shared.runtime import StartupError, serve
from shared.settings import print_invalid_settings
from shared.tasks import cancel

from .capture import Capture, ClaimSink
from .capture_thread import CaptureThread, FrameReader
from .claims import Claim
from .coalesce import Coalescer
from .heartbeat import Health, Heartbeat
from .metrics import WatcherMetrics
from .packet_socket import CaptureOpenError
from .publisher import ClaimBuffer, ClaimPublisher
from .ring import open_ring_reader
from .settings import WatcherSettings
from .socket_reader import open_socket_reader

log = logging.getLogger("services.arp_watcher")

SOURCE = "arp_watcher"


async def run(settings: WatcherSettings, stop: asyncio.Event, *, registry: CollectorRegistry = REGISTRY) -> int:
    loop = asyncio.get_running_loop()
    metrics = WatcherMetrics(registry)
    buffer = ClaimBuffer(settings.buffer_size, loop)

    coalescer = Coalescer(int(settings.coalesce_window_s * 1e9))

    def sink(claims: list[Claim]) -> None:  # in the capture thread
        buffer.put_many(coalescer.admit(claims))

    def on_error(_exc: BaseException) -> None:
        loop.call_soon_threadsafe(stop.set)

    try:
        capture = open_capture(settings, sink, on_error)
    except CaptureOpenError as exc:
        raise StartupError(str(exc), 2 if exc.config_error else 1) from exc

    metrics.watch_capture(
        capture.stats,
        buffered=lambda: len(buffer),
        dropped=lambda: buffer.dropped,
        coalesced=lambda: coalescer.coalesced,
    )
    if settings.metrics_port:
        try:
            serve_metrics(settings.metrics_port, settings.metrics_host, registry)
        except OSError as exc:
            capture.stop()
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}", 2
            ) from exc

    broker = Broker(settings, source=SOURCE)
    publisher = ClaimPublisher(
        broker,
        buffer,
        metrics,
        watcher_id=settings.watcher_id,
        interface=settings.interface,
        segment=settings.segment,
        source=SOURCE,
        batch_size=settings.batch_size,
        routine_linger_s=settings.routine_linger_s,
        partitions=settings.partitions,
        pause=broker.pause,
    )

    heartbeat = Heartbeat(
        broker,
        lambda: Health(capture.stats.kernel_drops, publisher.published),
        watcher_id=settings.watcher_id,
        interface=settings.interface,
        segment=settings.segment,
        interval_s=settings.heartbeat_interval_s,
        source=SOURCE,
    )

    async def connect_and_publish() -> None:
        if not await broker.connect(stop):
            return
        log.info("publishing claims", extra={"exchange": settings.exchange})
        # Beside the claims, never in their way: a heartbeat that fails is logged by run_periodically and the
        # next one comes at its time.
        beating = asyncio.create_task(
            run_periodically(
                heartbeat.beat,
                settings.heartbeat_interval_s,
                what="heartbeat",
                stop=stop,
                at_start=True,
                logger=log,
            ),
            name="heartbeat",
        )
        try:
            await publisher.run()
        finally:
            await cancel(beating)

    freeze_startup_heap()
    capture.start()
    log.info(
        "capture started",
        extra={
            "interface": settings.interface,
            "netns": settings.netns,
            "watcher_id": settings.watcher_id,
            "capture": settings.capture,
        },
    )
    publishing = asyncio.create_task(connect_and_publish(), name="publish claims")
    publishing.add_done_callback(lambda _task: stop.set())  # it only ends early on an unexpected error
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await asyncio.to_thread(capture.stop)
        publisher.close()
        failed = await _finish_publishing(publishing, settings.drain_timeout_s)
        if failed or len(buffer) or publisher.in_flight:
            log.error(
                "stopped before every claim was published",
                extra={"unpublished": len(buffer) + publisher.in_flight},
            )
        await broker.close()
        stats = capture.stats
        log.info(
            "stopped",
            extra={
                "frames": stats.frames,
                "claims": stats.claims,
                "published": publisher.published,
                "coalesced": coalescer.coalesced,
                "kernel_drops": stats.kernel_drops,
                "claims_dropped": buffer.dropped,
            },
        )
    return 1 if capture.error is not None or failed else 0


def open_capture(
    settings: WatcherSettings, sink: ClaimSink, on_error: Callable[[BaseException], object]
) -> Capture:
    """The capture thread over the reader HAVIP_CAPTURE names, not started; CaptureOpenError if its socket
    cannot be opened."""
    reader: FrameReader
    if settings.capture == "ring":
        reader = open_ring_reader(
            settings.interface,
            netns=settings.netns,
            promiscuous=settings.promiscuous,
            ignore_outgoing=settings.ignore_outgoing,
            block_size=settings.ring_block_kib * 1024,
            block_count=settings.ring_blocks,
            retire_timeout_ms=settings.ring_retire_timeout_ms,
        )
    else:
        reader = open_socket_reader(
            settings.interface,
            netns=settings.netns,
            rcvbuf_bytes=settings.rcvbuf_bytes,
            promiscuous=settings.promiscuous,
            ignore_outgoing=settings.ignore_outgoing,
        )
    return CaptureThread(reader, sink, on_error=on_error)


async def _finish_publishing(publishing: asyncio.Task[None], timeout_s: float) -> bool:
    """Let the publisher drain within `timeout_s`; True if it failed (an error, not a timeout)."""
    try:
        await asyncio.wait_for(asyncio.shield(publishing), timeout_s)
    except TimeoutError:
        await cancel(publishing)
        return False
    except Exception:
        log.exception("publishing failed")
        return True
    return False


def main() -> int:
    try:
        settings = WatcherSettings()  # `interface` comes from the environment (HAVIP_INTERFACE)
    except ValidationError as exc:
        return print_invalid_settings(WatcherSettings, exc)
    configure_logging(SOURCE, settings.log_level)
    # The capture thread parses while the event loop publishes: a loop waiting for the interpreter lock is a
    # takeover waiting; CPython's default switch interval (5 ms) would let the capture thread keep it that long.
    sys.setswitchinterval(0.0005)
    return serve(run, settings)
