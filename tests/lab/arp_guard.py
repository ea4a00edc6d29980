"""The network, not ARP, decides who gets an address: an anti-spoofing rule on the lab's bridge.

In a cloud VPC an instance cannot take an address by announcing it; the vSwitch only lets an instance speak ARP
for its own registered address, and the platform programs where everything else goes. :class:`ArpGuard` puts
that rule on the lab's bridge for one protected host (the client): an ARP frame forwarded toward the client's
port passes only when its sender (MAC, IP) pair is an instance's own (its ``eth0`` MAC and primary address).
Gratuitous ARPs and replies for a HAVIP — keepalived's announcements — are dropped on the way to the client,
while every other port (the watcher's capture port included) still receives them: the rule sits on the
bridge's forward hook and matches the client's port as output only.

It is an nftables ``bridge`` table in the lab's switch namespace (never in the root namespace: the host's
firewall is not touched); it ends with the namespace at teardown.

The instances are set to ``arp_announce=2``: when they must resolve the client to answer traffic sent to the
HAVIP, they ask with their own primary address (which the guard lets through) rather than with the HAVIP as
sender (which it drops, as it should). LVS-DR and keepalived guides recommend the same setting on VIP hosts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tests.lab.netns import Lab, LabHost
from tests.lab.proc import run

TABLE = "havip_lab_arp_guard"


class ArpGuard:
    """Only an instance's ARP about its own address reaches ``protected``; see the module docstring."""

    def __init__(self, lab: Lab, protected: LabHost, instances: Sequence[LabHost]) -> None:
        if protected in instances:
            raise ValueError("the protected host cannot also be one of the instances")
        self.lab = lab
        self.protected = protected
        self.instances = list(instances)

    def ruleset(self) -> str:
        """The nftables script that :meth:`install` loads (pure; shown by the demo)."""
        pairs = ", ".join(f"{host.mac} . {host.ip}" for host in self.instances)
        port = self.protected.port
        return "\n".join(
            [
                f"table bridge {TABLE} {{",
                "    set own_addresses {",
                "        type ether_addr . ipv4_addr",
                *([f"        elements = {{ {pairs} }}"] if pairs else []),
                "    }",
                "    chain forward {",
                "        type filter hook forward priority 0; policy accept;",
                f'        oifname "{port}" ether type arp arp saddr ether . arp saddr ip @own_addresses accept',
                f'        oifname "{port}" ether type arp counter drop',
                "    }",
                "}",
                "",
            ]
        )

    def install(self) -> None:
        """Load the table into the switch namespace and set ``arp_announce=2`` on the instances."""
        self.lab.load_switch_ruleset(self.ruleset(), "the ARP guard")
        for host in self.instances:
            announce = ("all", host.iface)
            host.run("sysctl", "-q", "-w", *(f"net.ipv4.conf.{conf}.arp_announce=2" for conf in announce))

    def dropped(self) -> int:
        """ARP frames kept from the protected host so far (the drop rule's counter)."""
        nft = ["ip", "netns", "exec", self.lab.switch_netns, "nft", "-j"]
        out = run([*nft, "list", "chain", "bridge", TABLE, "forward"]).stdout
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise RuntimeError(f"no counter in the {TABLE} forward chain")
