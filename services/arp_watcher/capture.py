"""What the watcher needs of an ARP capture, whichever reader is behind it (the TPACKET_V3 ring of ring.py or the
recvmsg socket of socket_reader.py): start it, read its counters, stop it, learn whether it failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .claims import Claim
from .frames import MALFORMED_REASONS, MalformedReason

# Called from the capture thread with the claims of one burst or block; must not block.
ClaimSink = Callable[[list[Claim]], None]


class CaptureStats:
    """Cumulative counters, written by the capture thread only and read by anyone (ints: no torn reads)."""

    __slots__ = (
        "claims",
        "kernel_drops",
        "kernel_packets",
        "malformed",
        "not_arp",
        "not_claims",
        "receive_errors",
    )

    def __init__(self) -> None:
        self.claims = 0
        self.not_claims = 0
        self.not_arp = 0
        self.malformed: dict[MalformedReason, int] = dict.fromkeys(MALFORMED_REASONS, 0)
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.receive_errors = 0

    @property
    def frames(self) -> int:
        return self.claims + self.not_claims + self.not_arp + sum(self.malformed.values())


class Capture(Protocol):
    """A capture thread handing claims to its sink (capture_thread.CaptureThread)."""

    @property
    def stats(self) -> CaptureStats: ...

    @property
    def error(self) -> BaseException | None:
        """What stopped the thread, if it stopped on an unexpected error."""
        ...

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, take the last kernel counters and release the socket."""
        ...
