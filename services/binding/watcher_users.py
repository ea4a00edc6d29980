"""Which broker user may speak for a segment: with a template such as `havip-watcher-{segment}`, the claims and
heartbeats of segment `s` count only if RabbitMQ says (a message's user_id, which it checks against the
publishing connection's user) that `havip-watcher-s` published them. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from shared.events import ClaimsObserved, EventData, WatcherHeartbeat

SEGMENT = "{segment}"


def watcher_user(template: str, segment: str) -> str:
    return template.replace(SEGMENT, segment)


class Published(Protocol):
    """A message as a consumer got it (shared.messaging.Delivery)."""

    @property
    def data(self) -> EventData: ...

    @property
    def user_id(self) -> str | None: ...


P = TypeVar("P", bound=Published)


@dataclass(frozen=True, slots=True)
class Impostor(Generic[P]):
    """A segment's claims or heartbeat published by another user."""

    delivery: P
    segment: str
    user: str | None  # who published it (None: the publisher did not say)
    expected: str


def sort_by_publisher(deliveries: Sequence[P], template: str | None) -> tuple[Sequence[P], list[Impostor[P]]]:
    """(the deliveries that may be decided, the watchers' messages from a user not entitled to their segment)."""
    if template is None:
        return deliveries, []
    entitled: list[P] = []
    impostors: list[Impostor[P]] = []
    for delivery in deliveries:
        data = delivery.data
        if isinstance(data, ClaimsObserved | WatcherHeartbeat):
            expected = watcher_user(template, data.segment)
            if delivery.user_id != expected:
                impostors.append(Impostor(delivery, data.segment, delivery.user_id, expected))
                continue
        entitled.append(delivery)
    return entitled, impostors


def publishers(impostors: Iterable[Impostor[P]]) -> set[tuple[str | None, str]]:
    return {(impostor.user, impostor.segment) for impostor in impostors}
