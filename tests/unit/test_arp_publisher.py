"""The hand-off buffer and the publishing loop, with a fake broker; and the watcher's metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from services.arp_watcher.capture import CaptureStats
from services.arp_watcher.claims import Claim
from services.arp_watcher.metrics import WatcherMetrics
from services.arp_watcher.publisher import ClaimBuffer, ClaimPublisher, pack_claim, unpack_claim
from shared.events import ClaimKind, ClaimObserved, Envelope

MAC = bytes.fromhex("02000000000a")
VIP = int(IPv4Address("192.0.2.10"))


def claim(i: int) -> Claim:
    return Claim("garp_request", None, MAC, MAC, VIP + i, VIP + i, time.time_ns() - 1_000_000)


class FakeBroker:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[list[Envelope]] = []
        self.published: list[Envelope] = []

    async def publish_many(self, envs: Sequence[Envelope]) -> None:
        self.calls.append(list(envs))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        self.published.extend(envs)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@given(
    kind=st.sampled_from(["garp_request", "arp_reply"]),
    vlan=st.none() | st.integers(min_value=0, max_value=4095),
    sender_mac=st.binary(min_size=6, max_size=6),
    eth_src=st.binary(min_size=6, max_size=6),
    sender_ip=st.integers(min_value=0, max_value=2**32 - 1),
    target_ip=st.integers(min_value=0, max_value=2**32 - 1),
    captured_at=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_buffered_claims_are_packed_losslessly(
    kind: ClaimKind,
    vlan: int | None,
    sender_mac: bytes,
    eth_src: bytes,
    sender_ip: int,
    target_ip: int,
    captured_at: int,
) -> None:
    original = Claim(kind, vlan, sender_mac, eth_src, sender_ip, target_ip, captured_at)
    packed = pack_claim(original)
    assert len(packed) == 31
    assert unpack_claim(packed) == original


async def test_buffer_wakes_the_loop_from_another_thread() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    waiter = asyncio.create_task(buffer.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    claims = [claim(1), claim(2)]
    thread = threading.Thread(target=buffer.put_many, args=(claims,))
    thread.start()
    async with asyncio.timeout(5):
        await waiter
    thread.join()
    assert buffer.take(10) == claims
    assert len(buffer) == 0


async def test_buffer_take_is_fifo_and_bounded_by_limit() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    claims = [claim(i) for i in range(5)]
    buffer.put_many(claims)
    assert buffer.take(3) == claims[:3]
    assert buffer.take(3) == claims[3:]
    assert buffer.take(3) == []


async def test_buffer_overflow_drops_the_oldest_and_counts() -> None:
    buffer = ClaimBuffer(3, asyncio.get_running_loop())
    claims = [claim(i) for i in range(5)]
    buffer.put_many(claims[:2])
    buffer.put_many(claims[2:])
    assert buffer.dropped == 2
    assert buffer.take(10) == claims[2:]


def test_buffer_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ClaimBuffer(0, asyncio.new_event_loop())


async def test_publisher_publishes_everything_in_batches_then_stops_when_closed() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(broker, buffer, metrics, watcher_id="h/eth0", interface="eth0", batch_size=4)
    task = asyncio.create_task(publisher.run())
    buffer.put_many([claim(i) for i in range(10)])
    await wait_until(lambda: len(broker.published) == 10)
    publisher.close()
    async with asyncio.timeout(5):
        await task
    assert [len(c) for c in broker.calls] == [4, 4, 2]
    env = broker.published[0]
    assert (env.type, env.source) == ("arp.claim.observed", "arp_watcher")
    data = ClaimObserved.model_validate(env.data)
    assert (data.watcher_id, data.interface, data.kind, data.sender_ip) == (
        "h/eth0",
        "eth0",
        "garp_request",
        IPv4Address("192.0.2.10"),
    )
    assert [ClaimObserved.model_validate(e.data).sender_ip for e in broker.published] == [
        IPv4Address(VIP + i) for i in range(10)
    ]
    assert registry.get_sample_value("havip_watcher_claims_published_total") == 10
    assert registry.get_sample_value("havip_watcher_publish_latency_seconds_count") == 10
    assert publisher.published == 10
    assert publisher.in_flight == 0


async def test_publisher_retries_the_same_events_with_backoff() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker(failures=3)
    publisher = ClaimPublisher(
        broker, buffer, metrics, watcher_id="w", interface="eth0", backoff_initial_s=0.01, backoff_max_s=0.02
    )
    task = asyncio.create_task(publisher.run())
    buffer.put_many([claim(1), claim(2)])
    await wait_until(lambda: len(broker.published) == 2)
    buffer.put_many([claim(3)])
    await wait_until(lambda: len(broker.published) == 3)
    publisher.close()
    async with asyncio.timeout(5):
        await task
    ids = [[e.event_id for e in call] for call in broker.calls]
    assert ids[0] == ids[1] == ids[2] == ids[3]  # retried with the same event ids
    assert registry.get_sample_value("havip_watcher_publish_failures_total") == 3
    assert registry.get_sample_value("havip_watcher_claims_published_total") == 3


async def test_close_drains_what_is_buffered() -> None:
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(
        broker, buffer, WatcherMetrics(CollectorRegistry()), watcher_id="w", interface="eth0", batch_size=2
    )
    buffer.put_many([claim(i) for i in range(5)])
    publisher.close()
    async with asyncio.timeout(5):
        await publisher.run()
    assert len(broker.published) == 5


def test_capture_metrics_are_exported_with_bounded_labels() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    stats = CaptureStats()
    stats.claims, stats.not_claims, stats.not_arp = 5, 7, 1
    stats.malformed["bad_hlen"] = 2
    stats.kernel_packets, stats.kernel_drops = 15, 0
    metrics.watch_capture(stats, buffered=lambda: 3, dropped=lambda: 4)
    value = registry.get_sample_value
    assert value("havip_watcher_frames_total", {"result": "claim"}) == 5
    assert value("havip_watcher_frames_total", {"result": "not_claim"}) == 7
    assert value("havip_watcher_frames_total", {"result": "not_arp"}) == 1
    assert value("havip_watcher_frames_total", {"result": "malformed"}) == 2
    assert value("havip_watcher_malformed_frames_total", {"reason": "bad_hlen"}) == 2
    assert value("havip_watcher_kernel_packets_total") == 15
    assert value("havip_watcher_kernel_drops_total") == 0
    assert value("havip_watcher_claims_dropped_total") == 4
    assert value("havip_watcher_claims_buffered") == 3
    stats.claims += 1  # read at scrape time
    assert value("havip_watcher_frames_total", {"result": "claim"}) == 6
    # Re-binding replaces the collector instead of failing on duplicate names.
    metrics.watch_capture(CaptureStats(), buffered=lambda: 0, dropped=lambda: 0)
    assert value("havip_watcher_frames_total", {"result": "claim"}) == 0
    text = generate_latest(registry).decode()
    for name in (
        "havip_watcher_frames_total",
        "havip_watcher_kernel_drops_total",
        "havip_watcher_kernel_packets_total",
        "havip_watcher_claims_published_total",
        "havip_watcher_publish_failures_total",
        "havip_watcher_publish_latency_seconds_bucket",
    ):
        assert name in text
