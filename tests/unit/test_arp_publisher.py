"""The hand-off buffer (newest claim per claimant, bounded) and the publishing loop, with a fake broker; and
the watcher's metrics."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import datetime
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from services.arp_watcher.capture import CaptureStats
from services.arp_watcher.claims import Claim
from services.arp_watcher.metrics import WatcherMetrics
from services.arp_watcher.publisher import ClaimBuffer, ClaimPublisher, claimant, pack_rest, unpack_claim
from shared.events import ClaimKind, ClaimsObserved, decode
from shared.partitions import claims_routing_key, partition_of
from tests.waiting import eventually

MAC = bytes.fromhex("02000000000a")
OTHER = bytes.fromhex("02000000000b")
VIP = int(IPv4Address("192.0.2.10"))


def claim(i: int, mac: bytes = MAC, *, at: int | None = None) -> Claim:
    return Claim("garp_request", None, mac, mac, VIP + i, VIP + i, at or time.time_ns() - 1_000_000)


class FakeBroker:
    """Records what would go to RabbitMQ; fails the first `failures` publishes."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts: list[bytes] = []
        self.events: list[ClaimsObserved] = []
        self.event_ids: list[uuid.UUID] = []
        self.routine: list[bool] = []  # the lane of each confirmed event
        self.routing_keys: list[str] = []
        self.partitions = 1  # the tests of batching and lanes use one partition; one of partitions sets its own

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
        assert event_type == "arp.claims.observed"
        self.attempts.append(body)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        env, data = decode(body)  # the pydantic contract
        assert env.event_id == event_id
        assert isinstance(data, ClaimsObserved)
        # One event per partition, routed to it (shared.partitions).
        assert routing_key is not None
        assert {claims_routing_key(partition_of(c.sender_ip, self.partitions)) for c in data.claims} == {
            routing_key
        }
        self.events.append(data)
        self.event_ids.append(event_id)
        self.routine.append(routine)
        self.routing_keys.append(routing_key)

    @property
    def claims(self) -> list[tuple[IPv4Address, str, int]]:
        return [(c.sender_ip, c.sender_mac, c.captured_at) for e in self.events for c in e.claims]


def unstamped(claims: list[Claim]) -> list[Claim]:
    """Claims as put into the buffer: without the time it stamped on them (Claim.read_at)."""
    return [c._replace(read_at=0) for c in claims]


@given(
    kind=st.sampled_from(["garp_request", "arp_reply"]),
    vlan=st.none() | st.integers(min_value=0, max_value=4095),
    sender_mac=st.binary(min_size=6, max_size=6),
    eth_src=st.binary(min_size=6, max_size=6),
    sender_ip=st.integers(min_value=0, max_value=2**32 - 1),
    target_ip=st.integers(min_value=0, max_value=2**32 - 1),
    captured_at=st.integers(min_value=0, max_value=2**64 - 1),
    repeats=st.integers(min_value=1, max_value=2**32 - 1),
    read_at=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_buffered_claims_are_packed_losslessly(
    kind: ClaimKind,
    vlan: int | None,
    sender_mac: bytes,
    eth_src: bytes,
    sender_ip: int,
    target_ip: int,
    captured_at: int,
    repeats: int,
    read_at: int,
) -> None:
    original = Claim(kind, vlan, sender_mac, eth_src, sender_ip, target_ip, captured_at, repeats, read_at=read_at)
    key, rest = claimant(original), pack_rest(original, repeats, read_at)
    assert len(key) + len(rest) == 43
    assert unpack_claim(key, rest) == original


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
    assert unstamped(buffer.take(10)) == claims
    assert len(buffer) == 0


async def test_buffer_take_is_earliest_first_and_bounded_by_limit() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    claims = [claim(i) for i in range(5)]
    buffer.put_many(claims)
    assert unstamped(buffer.take(3)) == claims[:3]
    assert unstamped(buffer.take(3)) == claims[3:]
    assert unstamped(buffer.take(3)) == []


async def test_buffer_keeps_the_newest_claim_of_each_claimant_and_every_claimant() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    t = time.time_ns()
    holder_refreshes = [claim(0, at=t + i) for i in range(4)]
    new_master = claim(0, OTHER, at=t + 10)
    spoofer = Claim("garp_request", None, OTHER, MAC, VIP, VIP, t + 20)  # same address, other Ethernet source
    buffer.put_many([holder_refreshes[0], new_master, *holder_refreshes[1:3], spoofer])
    buffer.put_many([holder_refreshes[3]])
    assert buffer.merged == 3
    # In the order of the newest claims: after an outage the binding service sees every change of holder.
    assert unstamped(buffer.take(10)) == [new_master, spoofer, holder_refreshes[3]._replace(repeats=4)]


async def test_renewals_wait_in_the_routine_lane_and_a_change_of_claimant_promotes_its_claimant() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    t = time.time_ns()
    refreshes = [claim(i, at=t + i)._replace(renewal=True) for i in range(3)]
    takeover = claim(5, OTHER, at=t + 5)
    buffer.put_many([*refreshes, takeover])
    # A renewal of a claimant whose claim is still waiting in the urgent lane stays with it there.
    later = claim(5, OTHER, at=t + 6)._replace(renewal=True)
    buffer.put_many([later])
    assert unstamped(buffer.take(10)) == [later._replace(repeats=2, renewal=False)]
    # A claimant that is not a renewal any more (the coalescer forgot it) leaves the routine lane.
    promoted = claim(1, at=t + 7)
    buffer.put_many([promoted])
    assert unstamped(buffer.take(10)) == [promoted._replace(repeats=2)]
    assert unstamped(buffer.take(10, routine=True)) == [refreshes[0], refreshes[2]]
    assert len(buffer) == 0


async def test_overflow_drops_renewals_before_changes_of_claimant() -> None:
    buffer = ClaimBuffer(3, asyncio.get_running_loop())
    urgent = [claim(i, OTHER) for i in range(2)]
    renewals = [claim(10)._replace(renewal=True), claim(11)._replace(renewal=True)]
    buffer.put_many([renewals[0], *urgent, renewals[1]])
    assert buffer.dropped == 1
    assert unstamped(buffer.take(10)) == urgent
    assert unstamped(buffer.take(10, routine=True)) == renewals[1:]


async def test_publisher_sends_a_change_of_claimant_while_renewals_wait_for_their_confirm() -> None:
    """The lanes publish independently: a takeover is never queued behind a batch of refreshes."""

    class SlowRoutine(FakeBroker):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

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
            if routine:
                await self.release.wait()  # the broker's confirm of the routine batch is slow
            await super().publish_encoded(
                event_type, body, event_id, occurred_at, routine=routine, routing_key=routing_key
            )

    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = SlowRoutine()
    publisher = ClaimPublisher(
        broker,
        buffer,
        WatcherMetrics(CollectorRegistry()),
        watcher_id="w",
        interface="eth0",
        partitions=1,
        batch_size=500,
    )
    task = asyncio.create_task(publisher.run())
    try:
        buffer.put_many([claim(i)._replace(renewal=True) for i in range(50)])
        await eventually(lambda: publisher.in_flight == 50, what="50 claims in flight")
        buffer.put_many([claim(99, OTHER)])
        await eventually(lambda: len(broker.events) == 1, what="1 event published")
        assert [c.sender_mac for c in broker.events[0].claims] == [OTHER.hex(":")]
        assert broker.routine == [False]
        broker.release.set()
        await eventually(lambda: len(broker.events) == 2, what="2 events published")
        assert broker.routine == [False, True]
        assert len(broker.events[1].claims) == 50
    finally:
        broker.release.set()
        publisher.close()
        async with asyncio.timeout(5):
            await task
    assert publisher.in_flight == 0


async def test_buffer_keeps_the_newer_claim_when_an_older_one_comes_late() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    t = time.time_ns()
    buffer.put_many([claim(0, at=t + 5), claim(0, at=t)])
    assert unstamped(buffer.take(10)) == [claim(0, at=t + 5)._replace(repeats=2)]


async def test_buffer_overflow_drops_the_oldest_claimants_and_counts() -> None:
    buffer = ClaimBuffer(3, asyncio.get_running_loop())
    claims = [claim(i) for i in range(5)]
    buffer.put_many(claims[:2])
    buffer.put_many(claims[2:])
    assert buffer.dropped == 2
    assert unstamped(buffer.take(10)) == claims[2:]


def test_buffer_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ClaimBuffer(0, asyncio.new_event_loop())


async def test_publisher_sends_what_is_buffered_as_batch_events_then_stops_when_closed() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(
        broker, buffer, metrics, watcher_id="h/eth0", interface="eth0", partitions=1, batch_size=4
    )
    buffer.put_many([claim(i) for i in range(10)])
    task = asyncio.create_task(publisher.run())
    await eventually(lambda: len(broker.claims) == 10, what="10 claims published")
    publisher.close()
    async with asyncio.timeout(5):
        await task
    assert [len(e.claims) for e in broker.events] == [4, 4, 2]
    first = broker.events[0]
    assert (first.watcher_id, first.interface, first.claims[0].kind) == ("h/eth0", "eth0", "garp_request")
    assert [ip for ip, _, _ in broker.claims] == [IPv4Address(VIP + i) for i in range(10)]
    assert len({c.claim_id for e in broker.events for c in e.claims}) == 10
    assert registry.get_sample_value("havip_watcher_claims_published_total") == 10
    assert registry.get_sample_value("havip_watcher_events_published_total") == 3
    assert registry.get_sample_value("havip_watcher_publish_latency_seconds_count") == 10
    assert publisher.published == 10
    assert publisher.in_flight == 0


async def test_a_single_claim_is_published_at_once_without_waiting_for_a_batch() -> None:
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(
        broker,
        buffer,
        WatcherMetrics(CollectorRegistry()),
        watcher_id="w",
        interface="eth0",
        partitions=1,
        batch_size=500,
    )
    task = asyncio.create_task(publisher.run())
    try:
        buffer.put_many([claim(1)])
        await eventually(lambda: len(broker.events) == 1, what="1 event published")
        assert len(broker.events[0].claims) == 1
    finally:
        publisher.close()
        async with asyncio.timeout(5):
            await task


async def test_publisher_retries_the_same_event_with_backoff() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker(failures=3)
    publisher = ClaimPublisher(
        broker,
        buffer,
        metrics,
        watcher_id="w",
        interface="eth0",
        partitions=1,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
    )
    task = asyncio.create_task(publisher.run())
    buffer.put_many([claim(1), claim(2)])
    await eventually(lambda: len(broker.claims) == 2, what="2 claims published")
    buffer.put_many([claim(3)])
    await eventually(lambda: len(broker.claims) == 3, what="3 claims published")
    publisher.close()
    async with asyncio.timeout(5):
        await task
    assert broker.attempts[0] == broker.attempts[1] == broker.attempts[2] == broker.attempts[3]  # same bytes
    assert len(broker.attempts) == 5
    assert registry.get_sample_value("havip_watcher_publish_failures_total") == 3
    assert registry.get_sample_value("havip_watcher_claims_published_total") == 3


async def test_close_drains_what_is_buffered() -> None:
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(
        broker,
        buffer,
        WatcherMetrics(CollectorRegistry()),
        watcher_id="w",
        interface="eth0",
        partitions=1,
        batch_size=2,
    )
    buffer.put_many([claim(i) for i in range(5)])
    publisher.close()
    async with asyncio.timeout(5):
        await publisher.run()
    assert len(broker.claims) == 5


def test_capture_metrics_are_exported_with_bounded_labels() -> None:
    registry = CollectorRegistry()
    metrics = WatcherMetrics(registry)
    stats = CaptureStats()
    stats.claims, stats.not_claims, stats.not_arp = 5, 7, 1
    stats.malformed["bad_hlen"] = 2
    stats.kernel_packets, stats.kernel_drops = 15, 0
    metrics.watch_capture(stats, buffered=lambda: 3, dropped=lambda: 4, coalesced=lambda: 9)
    value = registry.get_sample_value
    assert value("havip_watcher_frames_total", {"result": "claim"}) == 5
    assert value("havip_watcher_frames_total", {"result": "not_claim"}) == 7
    assert value("havip_watcher_frames_total", {"result": "not_arp"}) == 1
    assert value("havip_watcher_frames_total", {"result": "malformed"}) == 2
    assert value("havip_watcher_malformed_frames_total", {"reason": "bad_hlen"}) == 2
    assert value("havip_watcher_kernel_packets_total") == 15
    assert value("havip_watcher_kernel_drops_total") == 0
    assert value("havip_watcher_claims_dropped_total") == 4
    assert value("havip_watcher_claims_coalesced_total") == 9
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


async def test_the_buffer_stamps_the_hand_over_and_a_merge_keeps_the_kept_claims_stamp() -> None:
    buffer = ClaimBuffer(10, asyncio.get_running_loop())
    t = time.time_ns() - 5_000_000
    before = time.time_ns()
    buffer.put_many([claim(0, at=t), claim(1, at=t)])
    after = time.time_ns()
    buffer.put_many([claim(0, at=t + 1)])  # newer: replaces the first, handed over later
    buffer.put_many([claim(1, at=t - 1)])  # older (crossed): the kept claim keeps its hand-over time
    first, second = buffer.take(10)
    assert (first.sender_ip, second.sender_ip) == (VIP + 1, VIP)  # the newer went behind the other
    assert before <= first.read_at <= after
    assert after <= second.read_at <= time.time_ns()


async def test_the_publisher_times_the_hops_of_the_first_claim_of_each_urgent_event() -> None:
    registry = CollectorRegistry()
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    publisher = ClaimPublisher(
        broker, buffer, WatcherMetrics(registry), watcher_id="w", interface="eth0", partitions=1
    )
    captured = time.time_ns() - 3_000_000  # 3 ms before it is handed over
    task = asyncio.create_task(publisher.run())
    try:
        buffer.put_many([claim(1, at=captured), claim(2, at=captured - 1_000_000_000)])
        await eventually(lambda: len(broker.events) == 1, what="1 event published")
        buffer.put_many([claim(3)._replace(renewal=True)])  # the routine lane: not on a takeover's path
        await eventually(lambda: len(broker.events) == 2, what="2 events published")
    finally:
        publisher.close()
        async with asyncio.timeout(5):
            await task

    def hop(name: str, what: str) -> float | None:
        return registry.get_sample_value(f"havip_claim_hop_seconds_{what}", {"hop": name})

    assert [hop(name, "count") for name in ("read", "sent", "confirmed")] == [1, 1, 1]
    read = hop("read", "sum")
    assert read is not None
    assert 0.003 <= read < 1  # the first claim's, not the one captured a second earlier
    total = sum(hop(name, "sum") or 0 for name in ("read", "sent", "confirmed"))
    assert total <= (time.time_ns() - captured) / 1e9


async def test_claims_are_published_one_event_per_partition() -> None:
    """The binding replica deciding a partition receives its claims only: a batch over many addresses leaves as
    one event per partition, each routed by its partition's key."""
    buffer = ClaimBuffer(1000, asyncio.get_running_loop())
    broker = FakeBroker()
    broker.partitions = 4
    registry = CollectorRegistry()
    publisher = ClaimPublisher(
        broker, buffer, WatcherMetrics(registry), watcher_id="w", interface="eth0", partitions=4
    )
    assert registry.get_sample_value("havip_watcher_partitions") == 4  # compared with the binding replicas' P
    addresses = [VIP + i for i in range(40)]
    buffer.put_many([claim(i) for i in range(40)])
    task = asyncio.create_task(publisher.run())
    try:
        await eventually(lambda: len(broker.claims) == len(addresses), what="every claim published")
    finally:
        publisher.close()
        await asyncio.wait_for(task, 5)
    expected = {claims_routing_key(partition_of(address, 4)) for address in addresses}
    assert len(expected) == 4  # forty consecutive addresses reach every partition
    assert sorted(broker.routing_keys) == sorted(expected)
