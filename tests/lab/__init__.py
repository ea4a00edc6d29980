"""A closed network lab for tests, benchmarks and demos: namespaces on a bridge, keepalived pairs, captures.

Typical use::

    from tests.lab import Keepalived, Lab
    from tests.waiting import eventually_sync

    with Lab() as lab:
        h1 = lab.add_host("host1", "192.0.2.11")
        h2 = lab.add_host("host2", "192.0.2.12")
        cap = lab.add_capture_port()
        ka1 = Keepalived(h1, vip="192.0.2.100", peers=[h2.ip], priority=100, workdir=lab.workdir)
        ...
"""

from tests.lab.arp_guard import ArpGuard
from tests.lab.capture import ArpCapture, ArpFrame, garp_filter, parse_frame, parse_tcpdump_hex
from tests.lab.keepalived import Keepalived, render_config
from tests.lab.names import ALLOWED_NETWORKS, default_mac, new_prefix
from tests.lab.netns import (
    CaptureNamespace,
    CapturePort,
    Lab,
    LabHost,
    LabUnsupported,
    Namespace,
    leftovers,
    list_netns,
)
from tests.lab.proc import LabCommandError, ProcessRegistry, pid_alive

__all__ = [
    "ALLOWED_NETWORKS",
    "ArpCapture",
    "ArpFrame",
    "ArpGuard",
    "CaptureNamespace",
    "CapturePort",
    "Keepalived",
    "Lab",
    "LabCommandError",
    "LabHost",
    "LabUnsupported",
    "Namespace",
    "ProcessRegistry",
    "default_mac",
    "garp_filter",
    "leftovers",
    "list_netns",
    "new_prefix",
    "parse_frame",
    "parse_tcpdump_hex",
    "pid_alive",
    "render_config",
]
