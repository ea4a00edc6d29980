"""From the capture thread to RabbitMQ: a bounded hand-off buffer and the publishing loop.

The capture thread puts claims into `ClaimBuffer` (thread-safe, never blocks) and wakes the event loop only
when the buffer goes from empty to non-empty. The buffer keeps the newest claim per (VLAN, address, sender MAC,
Ethernet source): while RabbitMQ is slow or away, a holder's refreshes collapse into one entry, and what is
kept is exactly what the binding service needs to reach the right state afterwards — the newest claim of every
claimant of every address, spoofers' included, each with its own capture time. Memory is bounded by
`capacity` distinct claimants; beyond it the oldest entry is dropped and counted, so claims are lost only when
more distinct claimants than that were seen during one outage.

`ClaimPublisher` takes what the buffer holds (up to `batch_size` claims) and publishes it at once as one
`arp.claims.observed` event — never waiting to fill a batch — with the broker's confirm. An event that is not
confirmed is retried, the same bytes (so the same event and claim ids), with back-off, while new claims keep
collecting in the buffer; the robust connection reconnects on its own. Delivery is at least once, and the
binding service is idempotent on claim ids.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Final, Protocol

from tenacity import AsyncRetrying, RetryCallState

from shared.backoff import at_once_then_retrying, failure_of, retrying_with_backoff
from shared.events import CLAIMS_EVENT, DEFAULT_SEGMENT
from shared.hops import datetime_ns
from shared.partitions import DEFAULT_PARTITIONS, claims_routing_key, partition_of

from .claims import Claim
from .encoding import EncodedEvent, encode_claims
from .metrics import WatcherMetrics

log = logging.getLogger(__name__)


class EncodedPublisher(Protocol):
    async def publish_encoded(
        self,
        event_type: str,
        body: bytes,
        event_id: uuid.UUID,
        occurred_at: datetime | None = None,
        *,
        routine: bool = False,
        routing_key: str | None = None,
    ) -> None: ...


# A buffered claim is kept as two short byte strings (the claimant, the rest) instead of a ~350-byte tuple of
# objects: a backlog of 100,000 claimants during an outage then costs ~20 MB, not ~50 MB (the watcher's memory goal
# P5, docs/contract.md#figures).
_CLAIMANT = struct.Struct("=HI6s6s")  # vlan (0xFFFF = none), sender_ip, sender_mac, eth_src
_REST = struct.Struct("=BIQIQ")  # kind, target_ip, captured_at, repeats, read_at
_KINDS: Final = ("garp_request", "arp_reply")
_KIND_CODES: Final = {kind: code for code, kind in enumerate(_KINDS)}
_NO_VLAN: Final = 0xFFFF
_MAX_REPEATS: Final = 0xFFFFFFFF


def claimant(claim: Claim) -> bytes:
    """What the buffer keeps one claim per: (VLAN, address, sender MAC, Ethernet source)."""
    return _CLAIMANT.pack(
        _NO_VLAN if claim.vlan is None else claim.vlan, claim.sender_ip, claim.sender_mac, claim.eth_src
    )


def pack_rest(claim: Claim, repeats: int, read_at: int = 0) -> bytes:
    return _REST.pack(
        _KIND_CODES[claim.kind], claim.target_ip, claim.captured_at, min(repeats, _MAX_REPEATS), read_at
    )


def unpack_claim(key: bytes, rest: bytes, renewal: bool = False) -> Claim:
    vlan, sender_ip, sender_mac, eth_src = _CLAIMANT.unpack(key)
    kind, target_ip, captured_at, repeats, read_at = _REST.unpack(rest)
    return Claim(
        _KINDS[kind],
        None if vlan == _NO_VLAN else vlan,
        sender_mac,
        eth_src,
        sender_ip,
        target_ip,
        captured_at,
        repeats,
        renewal,
        read_at,
    )


class ClaimBuffer:
    """Bounded, thread-safe buffer of the newest claim per claimant, in the order of those claims' arrival.

    Two lanes: renewals (`Claim.renewal`, a holder's refreshes) wait in the routine lane; everything else — a
    new claimant, a spoofer — in the urgent lane, which the publisher never holds behind routine work. A
    claimant with a claim in the urgent lane keeps it there until it is published.
    """

    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._loop = loop
        # claimant -> rest; insertion-ordered: the oldest claimant first
        self._urgent: dict[bytes, bytes] = {}
        self._routine: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._urgent_ready = asyncio.Event()
        self._routine_ready = asyncio.Event()
        self.dropped = 0  # claims lost to overflow (more distinct claimants than `capacity`)
        self.merged = 0  # claims replaced by a newer one of the same claimant before they were published

    def __len__(self) -> int:
        return len(self._urgent) + len(self._routine)

    def put_many(self, claims: Sequence[Claim]) -> None:
        """Add claims (from any thread); never blocks. Each is stamped with the time it was handed over
        (`Claim.read_at`: the end of the hop `read`, shared/hops.py)."""
        if not claims:
            return
        read_at = time.time_ns()
        overflow = 0
        with self._lock:
            urgent, routine = self._urgent, self._routine
            had_urgent, had_routine = bool(urgent), bool(routine)
            for claim in claims:
                key = claimant(claim)
                lane = urgent if key in urgent or not claim.renewal else routine
                older = lane.get(key)
                if older is None:
                    older = routine.pop(key, None) if lane is urgent else None
                    if older is None:
                        lane[key] = pack_rest(claim, claim.repeats, read_at)
                        continue
                    lane[key] = older  # promoted: merged below like any other
                self.merged += 1
                kind, target_ip, older_at, older_repeats, older_read_at = _REST.unpack(older)
                repeats = min(older_repeats + claim.repeats, _MAX_REPEATS)
                if older_at <= claim.captured_at:  # keep the newest; frames from several queues may cross
                    # ... and move it behind the others, so that what is published after an outage goes out in
                    # the order of the claims' capture times: the binding service then records every change.
                    del lane[key]
                    lane[key] = pack_rest(claim, repeats, read_at)
                else:
                    lane[key] = _REST.pack(kind, target_ip, older_at, repeats, older_read_at)
            while len(urgent) + len(routine) > self.capacity:
                # Renewals go first: losing one only delays a last-seen time.
                del (routine or urgent)[next(iter(routine or urgent))]
                overflow += 1
            self.dropped += overflow
            wake_urgent = bool(urgent) and not had_urgent
            wake_routine = bool(routine) and not had_routine
        if overflow:
            log.warning(
                "claim buffer full: dropped the claims of %d claimants", overflow, extra={"dropped": overflow}
            )
        if wake_urgent:
            self._loop.call_soon_threadsafe(self._urgent_ready.set)
        if wake_routine:
            self._loop.call_soon_threadsafe(self._routine_ready.set)

    def _lane(self, routine: bool) -> dict[bytes, bytes]:
        return self._routine if routine else self._urgent

    def take(self, limit: int, *, routine: bool = False) -> list[Claim]:
        """Remove and return up to `limit` claims of one lane, the earliest first (event-loop side)."""
        with self._lock:
            items = self._lane(routine)
            if len(items) <= limit:
                taken = list(items.items())
                items.clear()
            else:
                keys = [key for key, _ in zip(items, range(limit), strict=False)]
                taken = [(key, items.pop(key)) for key in keys]
        return [unpack_claim(key, rest, routine) for key, rest in taken]

    async def wait(self, *, routine: bool = False) -> None:
        """Return once the lane holds a claim, or `wake` was called (event-loop side)."""
        ready = self._routine_ready if routine else self._urgent_ready
        ready.clear()  # before looking: a put after this sets it again
        if self._lane(routine):
            return
        await ready.wait()

    def wake(self) -> None:
        """Wake a waiting `wait` (e.g. to let the publisher notice it should stop)."""
        self._urgent_ready.set()
        self._routine_ready.set()


class ClaimPublisher:
    def __init__(
        self,
        broker: EncodedPublisher,
        buffer: ClaimBuffer,
        metrics: WatcherMetrics,
        *,
        watcher_id: str,
        interface: str,
        segment: str = DEFAULT_SEGMENT,
        source: str = "arp_watcher",
        batch_size: int = 500,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        routine_linger_s: float = 0.0,
        partitions: int = DEFAULT_PARTITIONS,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`pause`: the wait between two tries of a failed publish (Broker.pause: cut short when the broker is
        back)."""
        self._broker = broker
        self._pause = pause
        self._partitions = partitions
        self._buffer = buffer
        self._metrics = metrics
        metrics.partitions.set(partitions)
        self._watcher_id = watcher_id
        self._interface = interface
        self._segment = segment
        self._source = source
        self._batch_size = batch_size
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._routine_linger_s = routine_linger_s
        self._closing = False
        self.published = 0  # claims confirmed by the broker
        self.events = 0  # events (batches) confirmed
        self.in_flight = 0

    def close(self) -> None:
        """Ask `run` to return once everything buffered is published (bound it with a timeout)."""
        self._closing = True
        self._buffer.wake()

    async def run(self) -> None:
        """Publish until `close` was called and the buffer is empty: each lane on its own, so that a change of
        claimant never waits for the confirm of a batch of renewals."""
        await asyncio.gather(self._run_lane(routine=False), self._run_lane(routine=True))

    async def _run_lane(self, *, routine: bool) -> None:
        # Renewals gather for a moment between routine events: addresses' windows are spread over time, and a
        # trickle of tiny events would cost the binding service a transaction each (a takeover never lingers).
        linger = self._routine_linger_s if routine else 0.0
        while True:
            claims = self._buffer.take(self._batch_size, routine=routine)
            if not claims:
                if self._closing:
                    return
                await self._buffer.wait(routine=routine)
                continue
            # One event per partition: each goes to the binding replica deciding that partition's addresses.
            by_partition: dict[int, list[Claim]] = {}
            for claim in claims:
                by_partition.setdefault(partition_of(claim.sender_ip, self._partitions), []).append(claim)
            await asyncio.gather(
                *(self._publish_partition(partition, part, routine) for partition, part in by_partition.items())
            )
            if linger and not self._closing:
                await asyncio.sleep(linger)

    async def _publish_partition(self, partition: int, claims: list[Claim], routine: bool) -> None:
        event = encode_claims(
            claims,
            watcher_id=self._watcher_id,
            interface=self._interface,
            segment=self._segment,
            source=self._source,
        )
        await self._publish_with_retry(event, claims, routine=routine, routing_key=claims_routing_key(partition))

    async def _publish_with_retry(
        self, event: EncodedEvent, claims: list[Claim], *, routine: bool, routing_key: str
    ) -> None:
        def tell(state: RetryCallState) -> None:
            exc = failure_of(state)
            self._metrics.publish_failures.inc()
            log.warning(
                "publishing %d claims failed (%s: %s); retrying in %.1f s",
                len(claims),
                type(exc).__name__,
                exc,
                state.next_action.sleep if state.next_action is not None else 0.0,
                extra={"claims": len(claims), "buffered": len(self._buffer)},
            )

        # The same event again, for as long as it takes: the robust connection comes back by itself.
        def retrying() -> AsyncRetrying:
            return retrying_with_backoff(
                retry=lambda _exc: True,
                initial_s=self._backoff_initial_s,
                max_s=self._backoff_max_s,
                before_sleep=tell,
                pause=self._pause,
            )

        self.in_flight += len(claims)
        await at_once_then_retrying(
            lambda: self._broker.publish_encoded(
                CLAIMS_EVENT,
                event.body,
                event.event_id,
                event.occurred_at,
                routine=routine,
                routing_key=routing_key,
            ),
            retrying,
        )
        now = time.time_ns()
        observe = self._metrics.publish_latency.observe
        for claim in claims:
            observe(max(0, now - claim.captured_at) / 1e9)
        if not routine:  # the claim path of a takeover (renewals linger by design): its first claim's hops
            self._metrics.observe_hops(claims[0], datetime_ns(event.occurred_at), now)
        self._metrics.claims_published.inc(len(claims))
        self._metrics.events_published.inc()
        self.published += len(claims)
        self.events += 1
        self.in_flight -= len(claims)
