"""The capture thread's life cycle over a scripted reader: hand-over in lists of at most max_batch, stopping, a
reader that outlives stop(), receive errors, an unexpected error; and that it is the watcher's `Capture`."""

from __future__ import annotations

import errno
import threading
from ipaddress import IPv4Address

import pytest

from services.arp_watcher.capture import Capture
from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.claims import Claim

MAC = bytes.fromhex("02000000000a")
VIP = int(IPv4Address("192.0.2.10"))


def claim(n: int) -> Claim:
    return Claim(
        kind="garp_request",
        vlan=None,
        sender_mac=MAC,
        eth_src=MAC,
        sender_ip=VIP + n,
        target_ip=VIP + n,
        captured_at=n,
    )


class ScriptedReader:
    """Hands over `claims` once, reports receive errors with the codes in `errors`, then waits for stopping —
    or, when `ignore_stop`, for `release` instead."""

    def __init__(self, claims: list[Claim] | None = None, errors: tuple[int, ...] = ()) -> None:
        self.claims = claims or []
        self.errors = errors
        self.ignore_stop = False
        self.release = threading.Event()
        self.reading = threading.Event()
        self.woken = 0
        self.closed = False
        self.kernel = (0, 0)
        self.polled = threading.Event()

    def read_until_stopped(self, thread: CaptureThread) -> None:
        thread.hand_over(self.claims)
        thread.hand_over([])
        for code in self.errors:
            thread.receive_error(code)
        self.reading.set()
        if self.ignore_stop:
            self.release.wait(30)
            return
        while not thread.stopping.wait(0.01):
            thread.poll_kernel_stats_when_due()

    def wake(self) -> None:
        self.woken += 1

    def read_kernel_stats(self) -> tuple[int, int]:
        self.polled.set()
        counters, self.kernel = self.kernel, (0, 0)
        return counters

    def close(self) -> None:
        self.closed = True


def test_claims_are_handed_over_in_lists_of_at_most_max_batch_and_empty_lists_never() -> None:
    batches: list[list[Claim]] = []
    reader = ScriptedReader([claim(n) for n in range(7)])
    capture = CaptureThread(reader, batches.append, max_batch=3)
    capture.start()
    assert reader.reading.wait(20)
    capture.stop()
    assert [[c.captured_at for c in batch] for batch in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_stop_wakes_the_reader_takes_the_last_kernel_counters_and_closes_it() -> None:
    reader = ScriptedReader()
    capture = CaptureThread(reader, lambda batch: None, stats_interval_s=120.0)
    capture.start()
    assert reader.reading.wait(20)
    reader.kernel = (5, 2)
    capture.stop(timeout_s=30)
    assert not capture.running
    assert reader.woken == 1
    assert reader.closed
    assert (capture.stats.kernel_packets, capture.stats.kernel_drops) == (5, 2)
    assert capture.error is None


def test_kernel_counters_are_polled_while_reading() -> None:
    reader = ScriptedReader()
    reader.kernel = (3, 0)
    capture = CaptureThread(reader, lambda batch: None, stats_interval_s=0.01)
    capture.start()
    try:
        assert reader.polled.wait(20)
    finally:
        capture.stop()
    assert capture.stats.kernel_packets == 3


def test_a_reader_that_outlives_stop_keeps_its_socket_until_it_has_stopped() -> None:
    reader = ScriptedReader()
    reader.ignore_stop = True
    capture = CaptureThread(reader, lambda batch: None)
    capture.start()
    assert reader.reading.wait(20)
    capture.stop(timeout_s=0.01)
    assert capture.running
    assert not reader.closed  # never closed under a thread still reading it
    reader.release.set()
    capture.stop(timeout_s=30)
    assert not capture.running
    assert reader.closed
    assert capture.error is None


def test_receive_errors_are_counted_and_reading_goes_on() -> None:
    reader = ScriptedReader(errors=(errno.ENETDOWN, 0))
    capture = CaptureThread(reader, lambda batch: None)
    capture.start()
    assert reader.reading.wait(20)
    assert capture.running
    capture.stop()
    assert capture.stats.receive_errors == 2
    assert capture.error is None


def test_an_unexpected_error_stops_the_thread_and_is_reported() -> None:
    reported: list[BaseException] = []
    done = threading.Event()

    def sink(batch: list[Claim]) -> None:
        raise RuntimeError("sink broke")

    def on_error(exc: BaseException) -> None:
        reported.append(exc)
        done.set()

    reader = ScriptedReader([claim(1)])
    capture = CaptureThread(reader, sink, on_error=on_error)
    capture.start()
    assert done.wait(20)
    capture.stop()
    assert isinstance(capture.error, RuntimeError)
    assert reported == [capture.error]
    assert reader.closed


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        CaptureThread(ScriptedReader(), lambda batch: None, max_batch=0)


def test_the_capture_thread_is_the_watchers_capture() -> None:
    capture: Capture = CaptureThread(ScriptedReader(), lambda batch: None)  # checked by mypy
    assert not capture.running
    assert capture.error is None
    assert capture.stats.frames == 0
