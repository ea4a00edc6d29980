"""Pure formatting for havipctl: aligned tables, key/value views, times, one-line event summaries.

Nothing here does I/O; every function takes the API's (or an event's) decoded JSON and returns text.
Text that comes from the outside (names, event data) is printed with control characters escaped, so that no
value can move the cursor or recolour the terminal.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Json = Mapping[str, Any]

MISSING = "-"
_GAP = "  "
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:\d{2})$"
)


# ---- values -------------------------------------------------------------------------------------------------


def clean(text: str) -> str:
    """Control characters (newlines, escapes) shown as \\xNN: one value never breaks a line or the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_time(value: object) -> str:
    """An RFC 3339 time, compact but exact: `2025-01-31 12:00:00.123456Z` (UTC, microseconds always shown).

    Digits beyond microseconds are kept, never rounded; a value that is not a time is shown as it is.
    """
    if value is None:
        return MISSING
    text = str(value)
    match = _RFC3339.match(text)
    if match is None:
        return clean(text)
    frac = (match["frac"] or "").ljust(6, "0")
    zone = match["zone"]
    if zone in ("Z", "z", "+00:00", "-00:00"):
        return f"{match['date']} {match['time']}.{frac}Z"
    if len(frac) > 6:  # an offset to convert, and more precision than datetime holds: show as it came
        return clean(text)
    try:
        moment = datetime.fromisoformat(f"{match['date']}T{match['time']}.{frac}{zone}").astimezone(UTC)
    except ValueError:
        return clean(text)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%fZ")


def format_ns(value: object) -> str:
    """Nanoseconds since the Unix epoch (an ARP claim's capture time), exactly: `… 12:00:00.123456789Z`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return format_value(value)
    seconds, nanos = divmod(value, 1_000_000_000)
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{nanos:09d}Z"


def format_value(value: object, key: str = "") -> str:
    """One value for a table cell: null → -, booleans yes/no, times compact, lists comma-separated."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at"):
        return format_ns(value) if isinstance(value, int) else format_time(value)
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value) if value else MISSING
    if isinstance(value, dict):
        return clean(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return clean(str(value))


def display_width(text: str) -> int:
    """Columns the text takes in a terminal: wide East Asian characters 2, combining marks 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


# ---- tables -------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned, two spaces apart, no trailing spaces; a header line first."""
    all_rows = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(display_width(row[i]) for row in all_rows) for i in range(len(headers))]
    lines = []
    for row in all_rows:
        cells = [_pad(cell, widths[i]) for i, cell in enumerate(row)]
        lines.append(_GAP.join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str | Sequence[str]]]) -> str:
    """A two-column view: keys aligned; a value that is a list of lines continues under the first."""
    if not pairs:
        return ""
    width = max(display_width(key) for key, _ in pairs)
    lines = []
    for key, value in pairs:
        values = [value] if isinstance(value, str) else (list(value) or [MISSING])
        lines.append(f"{_pad(key, width)}{_GAP}{values[0]}".rstrip())
        lines.extend(f"{' ' * width}{_GAP}{more}".rstrip() for more in values[1:])
    return "\n".join(lines)


def _flatten(resource: Json, prefix: str = "") -> list[tuple[str, str | list[str]]]:
    pairs: list[tuple[str, str | list[str]]] = []
    for key, value in resource.items():
        name = f"{prefix}{clean(str(key))}"
        if isinstance(value, dict) and value:
            pairs.extend(_flatten(value, f"{name}."))
        elif isinstance(value, list) and value and not any(isinstance(v, dict | list) for v in value):
            pairs.append((name, [format_value(v) for v in value]))
        else:
            pairs.append((name, format_value(value, str(key))))
    return pairs


def show(resource: Json) -> str:
    """Every field of one resource, in the API's order (nested objects as dotted keys)."""
    return key_values(_flatten(resource))


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    value: Callable[[Json], str]


def field(key: str) -> Callable[[Json], str]:
    return lambda item: format_value(item.get(key), key)


def _count(key: str) -> Callable[[Json], str]:
    def count(item: Json) -> str:
        value = item.get(key)
        return str(len(value)) if isinstance(value, list) and value else MISSING

    return count


def _havip_flags(item: Json) -> str:
    flags = [label for key, label in (("flapping", "flapping"), ("split_brain", "split-brain")) if item.get(key)]
    return ",".join(flags) or MISSING


COLUMNS: dict[str, tuple[Column, ...]] = {
    "vpc": (
        Column("ID", field("id")),
        Column("NAME", field("name")),
        Column("CIDR", field("cidr")),
        Column("CREATED", field("created_at")),
    ),
    "subnet": (
        Column("ID", field("id")),
        Column("VPC", field("vpc_id")),
        Column("NAME", field("name")),
        Column("CIDR", field("cidr")),
        Column("GATEWAY", field("gateway")),
        Column("FREE", field("free_addresses")),
        Column("USABLE", field("usable_addresses")),
        Column("CREATED", field("created_at")),
    ),
    "instance": (
        Column("ID", field("id")),
        Column("SUBNET", field("subnet_id")),
        Column("NAME", field("name")),
        Column("IP", field("private_ip")),
        Column("MAC", field("mac")),
        Column("CREATED", field("created_at")),
    ),
    "havip": (
        Column("ID", field("id")),
        Column("NAME", field("name")),
        Column("ADDRESS", field("address")),
        Column("STATE", field("state")),
        Column("HOLDER", field("bound_instance_id")),
        Column("MAC", field("bound_mac")),
        Column("EIP", field("eip")),
        Column("CANDIDATES", _count("candidates")),
        Column("FLAGS", _havip_flags),
    ),
    "transition": (
        Column("SEQ", field("sequence")),
        Column("REASON", field("reason")),
        Column("CAUSE", field("cause")),
        Column("FROM", field("from_instance_id")),
        Column("TO", field("to_instance_id")),
        Column("MAC", field("mac")),
        Column("CAPTURED", field("captured_at")),
        Column("COMMITTED", field("committed_at")),
        Column("WATCHER", field("watcher_id")),
    ),
    "rejected_claim": (
        Column("CAPTURED", field("captured_at")),
        Column("ADDRESS", field("address")),
        Column("MAC", field("mac")),
        Column("REASON", field("reason")),
        Column("COUNT", field("count")),  # frames folded into this refusal (repeats within the audit window)
        Column("HAVIP", field("havip_id")),
        Column("WATCHER", field("watcher_id")),
    ),
}


def list_table(kind: str, items: Sequence[Json]) -> str:
    """A list of resources as a table; a kind without columns shows the first item's keys."""
    columns = COLUMNS.get(kind)
    if columns is None:
        keys = list(items[0].keys()) if items else []
        columns = tuple(Column(clean(str(k)).upper(), field(str(k))) for k in keys)
    return table([c.header for c in columns], ([c.value(item) for c in columns] for item in items))


# ---- events -------------------------------------------------------------------------------------------------

TYPE_WIDTH = 25  # len("havip.split_brain.started")


def _fact(key: str, value: object) -> str:
    text = format_value(value, key)
    if text == "" or any(ch.isspace() or ch in '="' for ch in text):
        text = '"' + text.replace('"', '\\"') + '"'
    return f"{key}={text}"


def _facts(data: Json, *keys: str) -> list[str]:
    """key=value for each key present and not null (a missing fact is left out, not shown as -)."""
    return [_fact(key, data[key]) for key in keys if data.get(key) is not None]


def _holder(holder: object) -> str:
    if not isinstance(holder, dict):
        return "none"
    mac = format_value(holder.get("mac"))
    return f"{mac} ({format_value(holder.get('instance_id'))})"


def _v(data: Json, key: str) -> str:
    return format_value(data.get(key), key)


CLAIMS_SHOWN = 3  # claims of an arp.claims.observed event shown on its line


def _claim_facts(claim: Json) -> str:
    parts = [f"{_v(claim, 'sender_ip')} is-at {_v(claim, 'sender_mac')}", *_facts(claim, "kind", "vlan")]
    if claim.get("eth_src") is not None and claim.get("eth_src") != claim.get("sender_mac"):
        parts += _facts(claim, "eth_src")
    if isinstance(claim.get("repeats"), int) and claim["repeats"] > 1:
        parts += _facts(claim, "repeats")
    if "captured_at" in claim:
        parts.append(f"captured={format_ns(claim['captured_at'])}")
    return "[" + "  ".join(parts) + "]"


def event_facts(event_type: str, data: Json) -> str:
    """The key facts of an event's data, by type (an unknown type: its data as compact JSON)."""
    parts: list[str]
    if event_type == "arp.claims.observed":
        claims = data.get("claims")
        claims = [c for c in claims if isinstance(c, dict)] if isinstance(claims, list) else []
        parts = [f"{len(claims)} claim{'' if len(claims) == 1 else 's'}", *_facts(data, "watcher_id", "interface")]
        parts += [_claim_facts(claim) for claim in claims[:CLAIMS_SHOWN]]
        if len(claims) > CLAIMS_SHOWN:
            parts.append(f"(+{len(claims) - CLAIMS_SHOWN} more)")
    elif event_type.startswith("vpc."):
        parts = [f"vpc {_v(data, 'id')}", *_facts(data, "name", "cidr")]
    elif event_type.startswith("subnet."):
        parts = [f"subnet {_v(data, 'id')}", *_facts(data, "name", "cidr", "vpc_id")]
    elif event_type.startswith("instance."):
        parts = [f"instance {_v(data, 'id')}", *_facts(data, "name", "private_ip", "mac", "subnet_id")]
    elif event_type.startswith("havip.eip."):
        parts = [_v(data, "eip"), *_facts(data, "havip_id")]
    elif event_type in ("havip.allocated", "havip.updated", "havip.released"):
        parts = [_v(data, "address"), f"havip {_v(data, 'id')}", *_facts(data, "name", "eip")]
        candidates = data.get("candidates")
        if isinstance(candidates, list) and candidates:
            parts.append(f"candidates={len(candidates)}")
    elif event_type == "havip.binding.changed":
        parts = [
            _v(data, "address"),
            f"{_holder(data.get('previous'))} → {_holder(data.get('current'))}",
            *_facts(data, "reason", "cause", "sequence", "havip_id", "watcher_id"),
        ]
    elif event_type == "havip.claim.rejected":
        parts = [_v(data, "address"), *_facts(data, "mac", "reason", "havip_id", "watcher_id")]
    elif event_type.startswith(("havip.flapping.", "havip.split_brain.")):
        parts = [
            _v(data, "address"),
            *_facts(data, "havip_id", "transitions_in_window", "claimants_in_window"),
        ]
    else:
        return clean(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return "  ".join(parts)


def event_line(envelope: Json) -> str:
    """One line for one event: time (occurred_at), type, key facts."""
    event_type = str(envelope.get("type") or "?")
    data = envelope.get("data")
    facts = event_facts(event_type, data) if isinstance(data, dict) else format_value(data)
    when = format_time(envelope.get("occurred_at"))
    return f"{when}  {_pad(clean(event_type), TYPE_WIDTH)}  {facts}".rstrip()
