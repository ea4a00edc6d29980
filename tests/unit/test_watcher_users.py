"""Which broker user may publish a segment's claims and heartbeats (services/binding/watcher_users.py)."""

from __future__ import annotations

from dataclasses import dataclass

from services.binding.watcher_users import publishers, sort_by_publisher, watcher_user
from shared.events import EventData, VpcData, WatcherHeartbeat


@dataclass(frozen=True)
class Message:
    data: EventData
    user_id: str | None


def beat(segment: str) -> WatcherHeartbeat:
    return WatcherHeartbeat.model_validate(
        {
            "watcher_id": "w",
            "interface": "eth0",
            "segment": segment,
            "interval_s": 5,
            "started_at": "2026-12-04T00:00:00Z",
            "sequence": 1,
            "kernel_drops": 0,
            "claims_published": 0,
        }
    )


def test_the_template_names_the_segments_user() -> None:
    assert watcher_user("havip-watcher-{segment}", "rack-1") == "havip-watcher-rack-1"


def test_without_a_template_everything_passes() -> None:
    messages = [Message(beat("rack-1"), None), Message(beat("rack-2"), "anyone")]
    assert sort_by_publisher(messages, None) == (messages, [])


def test_a_segments_messages_pass_only_from_its_user_and_other_events_always() -> None:
    inventory = Message(VpcData(id="00000000-0000-0000-0000-000000000001", name="v", cidr="192.0.2.0/24"), "guest")
    own = Message(beat("rack-1"), "havip-watcher-rack-1")
    other = Message(beat("rack-1"), "havip-watcher-rack-2")
    unsigned = Message(beat("rack-1"), None)
    entitled, impostors = sort_by_publisher([inventory, own, other, unsigned], "havip-watcher-{segment}")
    assert entitled == [inventory, own]
    assert [(i.delivery, i.user, i.expected) for i in impostors] == [
        (other, "havip-watcher-rack-2", "havip-watcher-rack-1"),
        (unsigned, None, "havip-watcher-rack-1"),
    ]
    assert publishers(impostors) == {("havip-watcher-rack-2", "rack-1"), (None, "rack-1")}
