"""Configuration of the watcher, from `HAVIP_`-prefixed environment variables."""

from __future__ import annotations

import socket
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.events import DEFAULT_SEGMENT, MAX_CLAIMS_PER_EVENT, MAX_HEARTBEAT_INTERVAL_S, SegmentName
from shared.settings import CommonSettings

_MIB = 1024 * 1024


class WatcherSettings(CommonSettings):
    # HAVIP_INTERFACE: the subnet's layer-2 interface (IFNAMSIZ: at most 15 characters).
    interface: str = Field(min_length=1, max_length=15, pattern=r"^[^\s/]+$")
    # HAVIP_NETNS: open the capture inside this network namespace (name from `ip netns add`, or a path).
    netns: str | None = None
    # HAVIP_SEGMENT: the layer-2 segment the interface is on (docs/contract.md#segments): claims are decided only
    # against the HAVIPs of the subnets attached to it. One segment needs no configuration.
    segment: SegmentName = DEFAULT_SEGMENT
    # HAVIP_WATCHER_ID: reported with every claim and heartbeat; unique among a segment's watchers. Default
    # "<hostname>/<interface>", "<hostname>/<netns>/<interface>" with HAVIP_NETNS (watchers in several namespaces
    # of one host): stable across restarts.
    watcher_id: str = Field(default="", max_length=200)  # filled in below when empty
    # HAVIP_HEARTBEAT_INTERVAL_S: an arp.watcher.heartbeat event this often while connected to the broker; the
    # binding service counts a watcher alive for 3 intervals after its last one.
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=MAX_HEARTBEAT_INTERVAL_S)
    # HAVIP_METRICS_PORT: Prometheus endpoint; 0 turns it off.
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # At most this many claims per arp.claims.observed event (what is buffered goes at once, never waiting).
    batch_size: int = Field(default=500, ge=1, le=MAX_CLAIMS_PER_EVENT)
    # Distinct claimants (VLAN, address, MAC, Ethernet source) whose newest claim is kept while RabbitMQ is slow
    # or away; beyond, the oldest claimant's claim is dropped (and counted).
    buffer_size: int = Field(default=100_000, ge=1, le=10_000_000)
    # Identical claims (address, MAC, Ethernet source, VLAN) within this window after a published one are
    # counted, not published; 0 publishes every frame.
    coalesce_window_s: float = Field(default=1.0, ge=0, le=60)
    # Renewals (a holder's refreshes) gather this long between two routine-lane events; changes of claimant
    # never wait.
    routine_linger_s: float = Field(default=0.1, ge=0, le=5)
    # How frames come from the kernel: a memory-mapped TPACKET_V3 ring (default), or one recvmsg per frame.
    capture: Literal["ring", "socket"] = "ring"
    # The ring: blocks of this many KiB (a power of two, at least the page size), how many, and how long the
    # kernel keeps a block open before handing a lone frame to the watcher (bounds a GARP's wait).
    ring_block_kib: int = Field(default=16, ge=4, le=4096)
    ring_blocks: int = Field(default=1024, ge=2, le=65_536)
    ring_retire_timeout_ms: int = Field(default=1, ge=1, le=1000)
    # Socket receive buffer of `capture=socket` (SO_RCVBUFFORCE with CAP_NET_ADMIN, else SO_RCVBUF up to
    # net.core.rmem_max).
    rcvbuf_bytes: int = Field(default=32 * _MIB, ge=64 * 1024, le=1024 * _MIB)
    # See ARP not addressed to this host (replies between others) where the segment delivers it.
    promiscuous: bool = True
    # Ignore frames this host sends itself (PACKET_IGNORE_OUTGOING).
    ignore_outgoing: bool = False
    # On SIGTERM: how long to keep publishing what is buffered before giving up.
    drain_timeout_s: float = Field(default=5.0, ge=0, le=300)

    @model_validator(mode="before")
    @classmethod
    def _default_watcher_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("watcher_id") and isinstance(data.get("interface"), str):
            netns = data.get("netns")
            where = f"{netns.strip('/')}/" if isinstance(netns, str) and netns.strip("/") else ""
            # Its tail if too long (a long namespace path): the interface and the namespace's own name count most.
            data = {**data, "watcher_id": f"{socket.gethostname()}/{where}{data['interface']}"[-200:]}
        return data

    @field_validator("netns")
    @classmethod
    def _check_netns(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value.startswith("/"):
            return value
        if "/" in value or value in (".", "..") or any(c.isspace() for c in value):
            raise ValueError("must be a network namespace name (as in `ip netns list`) or an absolute path")
        return value
