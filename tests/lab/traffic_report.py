"""Reading what the traffic probes saw (pure: no I/O): where datagrams landed, against where the client was told to
send them, and the gap the client saw. Times are ns since the epoch (CLOCK_REALTIME, one machine)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sent:
    """Datagram ``seq`` left the client; the kernel chose its destination MAC between ``before`` and ``after``."""

    seq: int
    before: int
    after: int


@dataclass(frozen=True)
class Answer:
    """The client got ``server``'s answer to datagram ``seq`` at ``at``."""

    seq: int
    server: str
    at: int


@dataclass(frozen=True)
class Arrival:
    """A frame addressed to ``server``'s MAC carrying datagram ``seq`` reached it at ``at`` (kernel time)."""

    seq: int
    server: str
    at: int


@dataclass(frozen=True)
class PathChange:
    """The client's path to the address was set to ``target`` (None: nowhere); the change took effect at some
    moment between ``started`` and ``finished`` (e.g. the consumer's neighbour programming)."""

    target: str | None
    started: int
    finished: int


@dataclass
class TrafficLog:
    sent: dict[int, Sent] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)

    def arrivals_at(self, server: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.server == server]

    def answers_from(self, server: str) -> list[Answer]:
        return [a for a in self.answers if a.server == server]

    def servers(self) -> set[str]:
        return {a.server for a in self.arrivals} | {a.server for a in self.answers}


def read_log(client_lines: Iterable[str], server_lines: Mapping[str, Iterable[str]]) -> TrafficLog:
    """Parse the JSON lines of ``udp_probe.py send`` (client) and ``serve`` (per server name)."""
    log = TrafficLog()
    for record in _records(client_lines):
        if record["event"] == "sent":
            log.sent[record["seq"]] = Sent(record["seq"], record["before"], record["after"])
        elif record["event"] == "answer":
            log.answers.append(Answer(record["seq"], record["server"], record["at"]))
    for server, lines in server_lines.items():
        log.arrivals += [Arrival(r["seq"], server, r["at"]) for r in _records(lines) if r["event"] == "arrival"]
    log.arrivals.sort(key=lambda a: a.at)
    log.answers.sort(key=lambda a: a.at)
    return log


def _records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if line:  # a line cut by the end of the process is incomplete JSON: skip it
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def allowed_targets(changes: Sequence[PathChange], start: int, end: int) -> set[str | None]:
    """Every target the client's path had at some moment in [start, end] (``changes`` in order)."""
    allowed: set[str | None] = set()
    in_effect: str | None = None
    previous: str | None = None
    for change in changes:
        if change.finished < start:
            in_effect = change.target
        elif change.started <= end:  # the change may have taken effect within [start, end]
            allowed |= {previous, change.target}
        previous = change.target
    allowed.add(in_effect)
    return allowed


def misdirected(log: TrafficLog, changes: Sequence[PathChange]) -> list[Arrival]:
    """Arrivals at a server that was not the client's target at any moment between the datagram's send and its
    arrival: traffic that reached a host the network had not given the address to."""
    wrong = []
    for arrival in log.arrivals:
        sent = log.sent.get(arrival.seq)
        start = sent.before if sent is not None else arrival.at
        if arrival.server not in allowed_targets(changes, start, arrival.at):
            wrong.append(arrival)
    return wrong


def first_arrival(log: TrafficLog, server: str, after: int) -> Arrival | None:
    return next((a for a in log.arrivals if a.server == server and a.at >= after), None)


@dataclass(frozen=True)
class Silence:
    """What the client saw between the old holder's last answer and the new holder's first."""

    last_old: Answer
    first_new: Answer
    unanswered: int  # datagrams sent in between that nobody answered
    duration_ns: int  # send time of the first answered by the new holder - send time of the last by the old


def silence(log: TrafficLog, old: str, new: str) -> Silence | None:
    """None unless the client got answers from ``old`` and then from ``new``."""
    new_answers = log.answers_from(new)
    if not new_answers:
        return None
    first_new = min(new_answers, key=lambda a: a.seq)
    old_answers = [a for a in log.answers_from(old) if a.seq < first_new.seq]
    if not old_answers:
        return None
    last_old = max(old_answers, key=lambda a: a.seq)
    answered = {a.seq for a in log.answers}
    unanswered = sum(1 for seq in range(last_old.seq + 1, first_new.seq) if seq not in answered)
    duration = log.sent[first_new.seq].before - log.sent[last_old.seq].before
    return Silence(last_old, first_new, unanswered, duration)
