"""Traffic follows the HAVIP: a keepalived failover with a client sending to the address the whole time (shared by
tests/e2e/test_traffic.py, which asserts on the outcome, and scripts/demo.py, which prints it).

The client cannot learn the address from ARP (:class:`tests.lab.arp_guard.ArpGuard` keeps every CVM's
announcements of it away), so its datagrams go where the network sends them: the example event consumer turns
each `havip.binding.changed` into a permanent neighbour entry in the client's namespace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.e2e.consumer import ExampleConsumer, epoch_ns
from tests.e2e.system import System, ok
from tests.lab import Keepalived, Lab, LabHost
from tests.lab.arp_guard import ArpGuard
from tests.lab.traffic import Traffic
from tests.lab.traffic_report import Arrival, PathChange, Silence, TrafficLog, first_arrival, misdirected, silence
from tests.waiting import eventually_sync

SUBNET = "192.0.2.0/24"
STEADY_ANSWERS = 20  # answers from a holder before the next step: the path is established, not just touched
FAILURES = ("stop", "kill", "link_down")


@dataclass
class TrafficLab:
    """Two CVMs and a client on one wire, the watcher's capture port, and the ARP guard in front of the client."""

    lab: Lab
    cvm1: LabHost
    cvm2: LabHost
    client: LabHost
    capture: str
    guard: ArpGuard

    @classmethod
    def build(cls, lab: Lab) -> TrafficLab:
        cvm1 = lab.add_host("cvm1", "192.0.2.11")
        cvm2 = lab.add_host("cvm2", "192.0.2.12")
        client = lab.add_host("client", "192.0.2.21")
        capture = lab.add_capture_port("cap")
        guard = ArpGuard(lab, client, [cvm1, cvm2])
        guard.install()
        return cls(lab, cvm1, cvm2, client, capture, guard)

    @property
    def cvms(self) -> list[LabHost]:
        return [self.cvm1, self.cvm2]

    def hosts(self) -> dict[str, tuple[str, str]]:
        """name -> (ip, mac) of every host, for registering them as instances."""
        return {h.name: (h.ip, h.mac) for h in (self.cvm1, self.cvm2, self.client)}

    def name_of_mac(self, mac: str | None) -> str | None:
        return None if mac is None else next(h.name for h in self.cvms if h.mac == mac)

    def neighbour_programmer(self, amqp_url: str, queue: str) -> ExampleConsumer:
        """The example consumer, programming the client's neighbour table (tracked by the lab)."""
        args = ("--program-neighbour", self.client.netns, self.client.iface)
        return ExampleConsumer(amqp_url, queue, *args, registry=self.lab.processes)


@dataclass
class FailoverOutcome:
    """Everything measured in one failover with traffic (times in ns since the epoch)."""

    havip: dict[str, Any]
    how: str
    failed_at: int
    history: list[dict[str, Any]]  # the binding's transitions, oldest first
    programmed: list[dict[str, Any]]  # the consumer's applied records for this HAVIP, in order
    changes: list[PathChange]  # where the client's path pointed, from those records
    traffic: TrafficLog
    arp_dropped: int  # ARP frames the guard kept from the client during the run
    client_neighbour: str  # `ip neigh show ADDRESS` in the client's namespace at the end
    probes_died: list[str]  # hosts whose traffic probe ended before the run did (their log is incomplete)

    @property
    def takeover(self) -> dict[str, Any]:
        return self.history[-1]

    @property
    def takeover_programmed(self) -> dict[str, Any]:
        return self.programmed[-1]

    def misdirected(self) -> list[Arrival]:
        return misdirected(self.traffic, self.changes)

    def silence(self) -> Silence | None:
        return silence(self.traffic, "cvm1", "cvm2")

    def queued_before_programmed(self) -> list[Arrival]:
        """Arrivals of datagrams sent before the client had any neighbour entry for the address: its kernel held
        them (unresolved, as ARP got no usable answer) and released them to the first programmed holder."""
        sent = self.traffic.sent
        return [a for a in self.traffic.arrivals if a.seq in sent and sent[a.seq].after < self.changes[0].started]

    def first_at_new_holder(self) -> Arrival | None:
        return first_arrival(self.traffic, "cvm2", self.failed_at)

    def segments_ms(self) -> list[tuple[str, float]]:
        """The interruption from the failure to the first datagram at the new holder, in consecutive parts."""
        captured = epoch_ns(self.takeover["captured_at"])
        committed = epoch_ns(self.takeover["committed_at"])
        received = epoch_ns(self.takeover_programmed["received_at"])
        programmed = epoch_ns(self.takeover_programmed["neighbour"]["programmed_at"])
        first = self.first_at_new_holder()
        # The consumer notes the time once `ip` has exited and it has seen so, which on a busy machine can be
        # after the kernel already sent a datagram the new way: that datagram proves the entry was set by then.
        in_effect = programmed if first is None else min(programmed, first.at)
        parts = [
            ("keepalived's detection (failure -> cvm2's first GARP on the wire)", captured - self.failed_at),
            ("capture -> commit (our share: GARP captured -> transition committed)", committed - captured),
            ("commit -> event delivered to the consumer (outbox relay, RabbitMQ)", received - committed),
            ("consumer's programming (event received -> neighbour entry set)", in_effect - received),
        ]
        if first is not None:
            parts.append(("entry set -> next datagram at cvm2 (the client's send interval)", first.at - in_effect))
        return [(what, ns / 1e6) for what, ns in parts]


def history(system: System, havip_id: str) -> list[dict[str, Any]]:
    with system.api() as api:
        items: list[dict[str, Any]] = ok(api.get(f"/havips/{havip_id}/transitions"))["items"]
    return list(reversed(items))


def bound_to(system: System, havip_id: str, instance_id: str) -> bool:
    with system.api() as api:
        havip = ok(api.get(f"/havips/{havip_id}"))
    return bool(havip["state"] == "BOUND" and havip["bound_instance_id"] == instance_id)


def fail(host: LabHost, keepalived: Keepalived, how: str) -> None:
    if how == "stop":
        keepalived.stop()
    elif how == "kill":
        keepalived.kill()
    elif how == "link_down":
        host.link_down()
    else:
        raise ValueError(f"no failure {how!r}; one of {FAILURES}")


def run_failover(
    system: System,
    tlab: TrafficLab,
    consumer: ExampleConsumer,
    inventory: dict[str, Any],
    *,
    how: str,
    vrid: int,
    advert_int: float = 1,
    say: Callable[[str], None] = lambda text: None,
    timeout: float = 30.0,
) -> FailoverOutcome:
    """Allocate a HAVIP, send to it from the client, start keepalived on cvm1 then cvm2, fail cvm1 (``how``),
    wait until the traffic reaches cvm2, and collect what happened. Leaves both CVMs without the address."""
    cvm1, cvm2, client = tlab.cvm1, tlab.cvm2, tlab.client
    cvm1_id = inventory["instances"]["cvm1"]["id"]
    cvm2_id = inventory["instances"]["cvm2"]["id"]
    with system.api() as api:
        havip: dict[str, Any] = ok(
            api.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": f"traffic-{how}"})
        )
    vip = havip["address"]
    say(f"HAVIP {havip['id']} allocated: {vip}")
    dropped_before = tlab.guard.dropped()

    def programmed(sequence: int) -> bool:
        return any(r["sequence"] == sequence for r in consumer.records("applied", havip["id"]))

    common: dict[str, Any] = {
        "vip": vip,
        "vrid": vrid,
        "advert_int": advert_int,
        "garp_master_delay": 1,
        "garp_master_refresh": 5,
    }
    workdir = tlab.lab.workdir
    ka1 = Keepalived(cvm1, peers=[cvm2.ip], priority=100, state="MASTER", workdir=workdir, **common)
    ka2 = Keepalived(cvm2, peers=[cvm1.ip], priority=80, state="BACKUP", workdir=workdir, **common)
    traffic = Traffic(client, tlab.cvms, vip, workdir=workdir)
    try:
        traffic.start()
        say(
            f"client {client.ip} sends a UDP datagram to {vip}:{traffic.port} every "
            f"{traffic.interval * 1000:g} ms; cvm1 and cvm2 answer with their name and log every datagram "
            "addressed to them"
        )
        # The intended master first, its claim committed, before the backup starts (a pair started at once may
        # elect the lower node first).
        ka1.start()
        say("keepalived started on cvm1 (priority 100); waiting for it to become master")
        eventually_sync(lambda: bound_to(system, havip["id"], cvm1_id), timeout=timeout, what="bound to cvm1")
        eventually_sync(lambda: programmed(1), timeout=timeout, what="client programmed for cvm1")
        eventually_sync(
            lambda: len(traffic.log().answers_from("cvm1")) >= STEADY_ANSWERS, timeout=timeout, what="cvm1 answers"
        )
        say(f"HAVIP bound to cvm1; the consumer pointed the client at {cvm1.mac}; cvm1 answers")
        ka2.start()
        say("keepalived started on cvm2 (priority 80, BACKUP)")
        answered = len(traffic.log().answers_from("cvm1"))
        eventually_sync(
            lambda: len(traffic.log().answers_from("cvm1")) >= answered + STEADY_ANSWERS,
            timeout=timeout,
            what="steady traffic to cvm1",
        )

        failed_at = time.time_ns()
        fail(cvm1, ka1, how)
        say(f"master failed ({how}); keepalived on cvm2 must notice, then we must follow")
        eventually_sync(lambda: bound_to(system, havip["id"], cvm2_id), timeout=timeout, what="bound to cvm2")
        eventually_sync(lambda: programmed(2), timeout=timeout, what="client programmed for cvm2")
        eventually_sync(
            lambda: len(traffic.log().answers_from("cvm2")) >= STEADY_ANSWERS, timeout=timeout, what="cvm2 answers"
        )
        say(f"HAVIP bound to cvm2; the consumer pointed the client at {cvm2.mac}; cvm2 answers")
    finally:
        traffic.stop()
        ka1.stop()
        ka2.stop()
        if how == "link_down":
            cvm1.link_up()
        for host in tlab.cvms:
            if host.has_address(vip):
                host.del_address(vip)

    records = consumer.records("applied", havip["id"])
    changes = [
        PathChange(
            tlab.name_of_mac(r["current_mac"]),
            epoch_ns(r["received_at"]),
            epoch_ns(r["neighbour"]["programmed_at"]),
        )
        for r in records
    ]
    return FailoverOutcome(
        havip=havip,
        how=how,
        failed_at=failed_at,
        history=history(system, havip["id"]),
        programmed=records,
        changes=changes,
        traffic=traffic.log(),
        arp_dropped=tlab.guard.dropped() - dropped_before,
        client_neighbour=client.iproute("neigh", "show", vip, "dev", client.iface).stdout.strip(),
        probes_died=list(traffic.died),
    )
