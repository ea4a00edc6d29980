"""Traffic follows the HAVIP (the seed's point): the client's ARP is no help — the lab's bridge keeps every CVM's
announcement of the address from it, as a cloud VPC does — so its datagrams reach a CVM only because the example
event consumer programmed the client from `havip.binding.changed`. Through a keepalived failover they must reach
cvm2 afterwards, and never a CVM the client was not pointed at, which in turn must follow the binding history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.consumer import ExampleConsumer, epoch_ns
from tests.e2e.system import System, register_inventory
from tests.e2e.traffic_failover import SUBNET, FailoverOutcome, TrafficLab, run_failover
from tests.lab import Lab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tlab() -> Iterator[TrafficLab]:
    with Lab(SUBNET) as lab:
        yield TrafficLab.build(lab)


@pytest.fixture(scope="module")
def system(
    tlab: TrafficLab, database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with System(database_url, amqp_url, tlab.capture, tmp_path_factory.mktemp("services")) as system:
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, tlab: TrafficLab) -> dict[str, Any]:
    return register_inventory(system, "traffic", SUBNET, tlab.hosts())


@pytest.fixture(scope="module")
def consumer(system: System, tlab: TrafficLab) -> Iterator[ExampleConsumer]:
    with tlab.neighbour_programmer(system.amqp_url, "e2e.neighbours") as consumer:
        yield consumer


@pytest.mark.parametrize(("how", "vrid"), [("stop", 71), ("kill", 72)])
def test_traffic_reaches_the_new_holder_and_never_a_cvm_without_the_havip(
    system: System, tlab: TrafficLab, inventory: dict[str, Any], consumer: ExampleConsumer, how: str, vrid: int
) -> None:
    # advert_int 0.5 s (VRRPv3): keepalived elects and detects in about 1.8 s instead of 3.7 s, which keeps the
    # test short, with room for a busy machine (a master stalled past 3 adverts would fail over by itself);
    # what the test checks does not depend on keepalived's timing (the demo runs with 1 s).
    outcome = run_failover(system, tlab, consumer, inventory, how=how, vrid=vrid, advert_int=0.5)
    assert outcome.probes_died == []
    names = {inventory["instances"][n]["id"]: n for n in ("cvm1", "cvm2")}
    traffic = outcome.traffic

    # The binding moved cvm1 -> cvm2, and the consumer pointed the client exactly that way, after each commit.
    assert [(t["sequence"], names.get(t["to_instance_id"])) for t in outcome.history] == [(1, "cvm1"), (2, "cvm2")]
    assert [(r["sequence"], r["current_mac"]) for r in outcome.programmed] == [
        (1, tlab.cvm1.mac),
        (2, tlab.cvm2.mac),
    ]
    for transition, record in zip(outcome.history, outcome.programmed, strict=True):
        assert epoch_ns(record["received_at"]) >= epoch_ns(transition["committed_at"])
    assert [c.target for c in outcome.changes] == ["cvm1", "cvm2"]

    # Never to a CVM the client was not pointed at (so, by the above, one without the binding): not to cvm1
    # before the network gave it the address although keepalived had, not to cvm1 after the binding moved.
    assert outcome.misdirected() == []
    assert traffic.arrivals_at("cvm1"), "cvm1 got no traffic while it held the HAVIP"
    first_change_done = outcome.changes[0].finished
    assert all(a.at >= outcome.changes[0].started for a in traffic.arrivals)
    takeover_done = outcome.changes[1].finished
    assert [a for a in traffic.arrivals_at("cvm1") if a.at > takeover_done] == []
    assert first_change_done < takeover_done
    # Until the binding moved, the client kept sending to cvm1 (keepalived's detection is not ours to hide).
    assert [a for a in traffic.arrivals_at("cvm1") if outcome.failed_at < a.at < outcome.changes[1].started]

    # The traffic reaches cvm2 after the failover, and cvm2 answers it.
    at_cvm2 = traffic.arrivals_at("cvm2")
    assert at_cvm2
    assert min(a.at for a in at_cvm2) >= outcome.changes[1].started
    assert len(traffic.answers_from("cvm2")) >= 20
    assert {a.server for a in traffic.answers if traffic.sent[a.seq].before > takeover_done} == {"cvm2"}

    # ARP never told the client: the guard dropped the CVMs' announcements, and its entry is the programmed one.
    assert outcome.arp_dropped > 0
    assert tlab.cvm2.mac in outcome.client_neighbour
    assert "PERMANENT" in outcome.client_neighbour
    report(outcome)


def report(outcome: FailoverOutcome) -> None:
    """The measured parts of the interruption, shown with -s (and kept in the log of a failing run)."""
    print(f"\nfailover with traffic ({outcome.how}):")
    for what, ms in outcome.segments_ms():
        print(f"  {what:<72} {ms:9.2f} ms")
