"""The capture thread: one life cycle — start, stop, the kernel's counters, an unexpected error — around the
reading loop of whichever reader it is given (ring.RingReader or socket_reader.SocketReader)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .capture import CaptureStats, ClaimSink
from .claims import Claim

log = logging.getLogger(__name__)

# How long a reader pauses after a transient receive error (the interface went down, ...): the error repeats
# until the interface is back, and each one is logged.
RECEIVE_ERROR_PAUSE_S = 0.1


class FrameReader(Protocol):
    """A capture socket (with its ring, if any) and the loop that reads it."""

    @property
    def closed(self) -> bool: ...

    def read_until_stopped(self, thread: CaptureThread) -> None:
        """Read frames until `thread.stopping` is set: count them into `thread.stats`, give the claims to
        `thread.hand_over`, and call `thread.poll_kernel_stats_when_due()` at least once per wait."""
        ...

    def wake(self) -> None:
        """Make a `read_until_stopped` waiting for frames look at `stopping` now (from another thread)."""
        ...

    def read_kernel_stats(self) -> tuple[int, int]:
        """(packets, drops) since the previous read (the kernel resets them); packets include the drops."""
        ...

    def close(self) -> None: ...


class CaptureThread:
    """Runs `reader` in a dedicated thread, which hands claims to `sink` in lists of at most `max_batch`.

    `sink` is called from the capture thread and must not block (e.g. a bounded buffer that wakes the event
    loop). `on_error` is called from the capture thread if it stops on an unexpected error.
    """

    def __init__(
        self,
        reader: FrameReader,
        sink: ClaimSink,
        *,
        max_batch: int = 1024,
        stats_interval_s: float = 1.0,
        on_error: Callable[[BaseException], object] | None = None,
        name: str = "arp-capture",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._reader = reader
        self.max_batch = max_batch
        self.stats_interval_s = stats_interval_s
        self.stopping = threading.Event()
        self.stats = CaptureStats()
        self.error: BaseException | None = None
        self._sink = sink
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stats_lock = threading.Lock()
        self._next_stats = 0.0

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (woken at once, or within the reader's poll interval), take the last kernel counters
        and close the reader. A thread still reading after `timeout_s` keeps its reader open."""
        self.stopping.set()
        self._reader.wake()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("capture thread still running %.1f s after stop; leaving its socket open", timeout_s)
            return
        if not self._reader.closed:
            with contextlib.suppress(OSError):
                self.poll_kernel_stats()
            self._reader.close()

    def poll_kernel_stats(self) -> None:
        with self._stats_lock:
            packets, drops = self._reader.read_kernel_stats()
            self.stats.kernel_packets += packets
            self.stats.kernel_drops += drops
        if drops:
            log.warning("kernel dropped %d ARP frames", drops, extra={"kernel_drops": drops})

    # ---- called by the reader, in the capture thread ---------------------------------------------------------

    def hand_over(self, claims: list[Claim]) -> None:
        max_batch = self.max_batch
        if len(claims) <= max_batch:
            if claims:
                self._sink(claims)
            return
        for start in range(0, len(claims), max_batch):
            self._sink(claims[start : start + max_batch])

    def poll_kernel_stats_when_due(self) -> None:
        if time.monotonic() >= self._next_stats:
            self.poll_kernel_stats()
            self._next_stats = time.monotonic() + self.stats_interval_s

    def receive_error(self, code: int) -> None:
        """A transient receive error: counted, logged, then a short pause (cut short by stop())."""
        self.stats.receive_errors += 1
        log.warning("capture socket: %s", os.strerror(code) if code else "error", extra={"errno": code})
        self.stopping.wait(RECEIVE_ERROR_PAUSE_S)

    def _run(self) -> None:
        self._next_stats = time.monotonic() + self.stats_interval_s
        try:
            self._reader.read_until_stopped(self)
        except BaseException as exc:
            self.error = exc
            log.exception("capture thread stopped")
            if self._on_error is not None:
                self._on_error(exc)
