"""havipctl's pure formatting: times, tables, key/value views, event lines."""

from __future__ import annotations

from typing import Any

import pytest

from havipctl import render

HAVIP: dict[str, Any] = {
    "id": "8eafa7e0-e78e-4fc6-9cd3-b893849b0f70",
    "name": "vip1",
    "vpc_id": "4e6a271b-80a7-4b18-bb84-3db840eca33b",
    "subnet_id": "8709a781-3356-4229-a74b-14e3630b83bf",
    "address": "10.20.1.2",
    "state": "BOUND",
    "bound_instance_id": "3c0bece0-ddae-4bc4-b15d-dc0a0ba3f8e8",
    "bound_mac": "02:00:00:00:00:01",
    "last_transition_at": "2026-11-26T06:27:30.050903Z",
    "last_seen_at": None,
    "candidates": ["3c0bece0-ddae-4bc4-b15d-dc0a0ba3f8e8", "35cf8d82-1ffd-48bc-8b12-1f179f4a0baf"],
    "eip": None,
    "flapping": True,
    "split_brain": False,
    "created_at": "2026-11-26T06:27:30Z",
}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("2026-11-26T06:27:30.050903Z", "2026-11-26 06:27:30.050903Z"),
        ("2026-11-26T06:27:30Z", "2026-11-26 06:27:30.000000Z"),  # pydantic drops a zero fraction
        ("2026-11-26T06:27:30.5+00:00", "2026-11-26 06:27:30.500000Z"),
        ("2026-11-26T08:27:30.000001+02:00", "2026-11-26 06:27:30.000001Z"),
        ("2026-11-26T06:27:30.123456789Z", "2026-11-26 06:27:30.123456789Z"),  # never rounded
        (None, "-"),
        ("yesterday", "yesterday"),
        ("bad\x1b[31m", "bad\\x1b[31m"),
    ],
)
def test_format_time_is_compact_and_exact(value: str | None, shown: str) -> None:
    assert render.format_time(value) == shown


def test_format_ns_keeps_every_nanosecond() -> None:
    assert render.format_ns(1_764_138_450_123_456_789) == "2025-11-26 06:27:30.123456789Z"
    assert render.format_ns(5) == "1970-01-01 00:00:00.000000005Z"
    assert render.format_ns("x") == "x"


def test_format_value() -> None:
    assert render.format_value(None) == "-"
    assert render.format_value(True) == "yes"
    assert render.format_value(False) == "no"
    assert render.format_value([]) == "-"
    assert render.format_value(["a", "b"]) == "a, b"
    assert render.format_value(3) == "3"
    assert render.format_value("2026-11-26T06:27:30Z", "created_at") == "2026-11-26 06:27:30.000000Z"
    assert render.format_value("2026-11-26T06:27:30Z", "name") == "2026-11-26T06:27:30Z"  # only *_at are times
    assert render.format_value("line\nbreak") == "line\\x0abreak"


def test_table_aligns_columns_without_trailing_spaces() -> None:
    text = render.table(["ID", "NAME", "X"], [["1", "alpha", ""], ["22", "b", "-"]])
    assert text.splitlines() == ["ID  NAME   X", "1   alpha", "22  b      -"]


def test_table_counts_wide_characters_as_two_columns() -> None:
    text = render.table(["NAME", "CIDR"], [["网关", "10.0.0.0/8"], ["ab", "10.1.0.0/16"]])
    lines = text.splitlines()
    assert lines[1] == "网关  10.0.0.0/8"
    assert lines[2] == "ab    10.1.0.0/16"
    assert render.display_width("网关") == 4
    assert render.display_width("e\u0301") == 1  # a combining accent takes no column


def test_table_of_nothing_is_the_header() -> None:
    assert render.table(["A", "B"], []) == "A  B"


def test_show_is_a_key_value_view_in_the_api_order() -> None:
    lines = render.show(HAVIP).splitlines()
    assert lines[0] == "id                  8eafa7e0-e78e-4fc6-9cd3-b893849b0f70"
    keys = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert keys == list(HAVIP)
    by_key = {line.split()[0]: line.split(None, 1)[1] for line in lines if not line.startswith(" ")}
    assert by_key["last_seen_at"] == "-"
    assert by_key["last_transition_at"] == "2026-11-26 06:27:30.050903Z"
    assert by_key["created_at"] == "2026-11-26 06:27:30.000000Z"
    assert by_key["flapping"] == "yes"
    assert by_key["split_brain"] == "no"
    # a list: one item per line, the next ones under the first
    at = lines.index("candidates          3c0bece0-ddae-4bc4-b15d-dc0a0ba3f8e8")
    assert lines[at + 1] == " " * 20 + "35cf8d82-1ffd-48bc-8b12-1f179f4a0baf"


def test_show_flattens_nested_objects() -> None:
    text = render.show({"id": "x", "binding": {"instance_id": "i", "mac": None}, "empty": {}})
    assert text.splitlines() == [
        "id                   x",
        "binding.instance_id  i",
        "binding.mac          -",
        "empty                {}",
    ]


def test_havip_list_table() -> None:
    lines = render.list_table("havip", [HAVIP, {**HAVIP, "id": "other", "candidates": [], "flapping": False}])
    header, first, second = lines.splitlines()
    assert header.split() == ["ID", "NAME", "ADDRESS", "STATE", "HOLDER", "MAC", "EIP", "CANDIDATES", "FLAGS"]
    assert first.split() == [
        HAVIP["id"],
        "vip1",
        "10.20.1.2",
        "BOUND",
        HAVIP["bound_instance_id"],
        "02:00:00:00:00:01",
        "-",
        "2",
        "flapping",
    ]
    assert second.split()[-2:] == ["-", "-"]
    # every column starts where its header starts
    for cell in ("10.20.1.2", "BOUND", "02:00:00:00:00:01"):
        assert first.index(cell) == header.index({"10.20.1.2": "ADDRESS", "BOUND": "STATE"}.get(cell, "MAC"))


def test_rejected_claims_table_shows_the_frames_folded_into_each_row() -> None:
    refusal = {
        "havip_id": "8eafa7e0-e78e-4fc6-9cd3-b893849b0f70",
        "address": "10.20.1.2",
        "mac": "02:00:00:00:00:66",
        "reason": "unknown_mac",
        "captured_at": "2026-11-26T06:27:30.050903Z",
        "watcher_id": "w1",
        "count": 4812,
    }
    header, first, second = render.list_table("rejected_claim", [refusal, {**refusal, "count": 1}]).splitlines()
    assert header.split() == ["CAPTURED", "ADDRESS", "MAC", "REASON", "COUNT", "HAVIP", "WATCHER"]
    assert first.split() == [
        "2026-11-26",
        "06:27:30.050903Z",
        "10.20.1.2",
        "02:00:00:00:00:66",
        "unknown_mac",
        "4812",
        refusal["havip_id"],
        "w1",
    ]
    assert second.split()[5] == "1"
    assert first.index("4812") == header.index("COUNT")


@pytest.mark.parametrize("kind", sorted(render.COLUMNS))
def test_every_kind_renders_an_empty_and_a_sparse_item(kind: str) -> None:
    text = render.list_table(kind, [{}])
    header, row = text.splitlines()
    assert len(header.split()) == len(render.COLUMNS[kind])
    assert set(row.split()) == {"-"}


def test_unknown_kind_uses_the_items_keys() -> None:
    assert render.list_table("thing", [{"a_b": 1, "c": None}]).splitlines() == ["A_B  C", "1    -"]


# ---- events -------------------------------------------------------------------------------------------------


def envelope(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": "4f1e5b9e-0d7c-4f5e-9d8e-2b9f0c1d2e3f",
        "type": event_type,
        "schema_version": 1,
        "occurred_at": "2026-11-26T06:27:28.406116Z",
        "source": "allocator",
        "data": data,
    }


def test_event_line_vpc_created() -> None:
    line = render.event_line(envelope("vpc.created", {"id": "v1", "name": "prod", "cidr": "10.20.0.0/16"}))
    assert line == ("2026-11-26 06:27:28.406116Z  vpc.created                vpc v1  name=prod  cidr=10.20.0.0/16")


def test_event_line_quotes_values_with_spaces() -> None:
    data = {"id": "h", "vpc_id": "v", "subnet_id": "s", "name": "vip one", "address": "10.0.0.4", "candidates": []}
    line = render.event_line(envelope("havip.updated", data))
    assert line.endswith('havip.updated              10.0.0.4  havip h  name="vip one"')


def test_event_line_binding_changed_shows_from_to_and_macs() -> None:
    data = {
        "havip_id": "h",
        "address": "10.0.0.4",
        "previous": {"instance_id": "i1", "mac": "02:00:00:00:00:01"},
        "current": {"instance_id": "i2", "mac": "02:00:00:00:00:02"},
        "captured_at": "2026-11-26T06:27:28.400000Z",
        "committed_at": "2026-11-26T06:27:28.401000Z",
        "watcher_id": "w1",
        "sequence": 7,
        "reason": "claim",
    }
    line = render.event_line(envelope("havip.binding.changed", data))
    assert "10.0.0.4  02:00:00:00:00:01 (i1) → 02:00:00:00:00:02 (i2)  reason=claim  sequence=7" in line
    released = render.event_line(envelope("havip.binding.changed", {**data, "current": None, "reason": "release"}))
    assert "→ none  reason=release" in released
    first = render.event_line(envelope("havip.binding.changed", {**data, "previous": None}))
    assert "10.0.0.4  none → 02:00:00:00:00:02 (i2)" in first


def test_event_line_claim_rejected() -> None:
    data = {
        "address": "10.0.0.4",
        "havip_id": None,
        "mac": "02:00:00:00:00:09",
        "reason": "unknown_mac",
        "captured_at": "2026-11-26T06:27:28.400000Z",
        "watcher_id": "w1",
    }
    line = render.event_line(envelope("havip.claim.rejected", data))
    assert line.endswith(
        "havip.claim.rejected       10.0.0.4  mac=02:00:00:00:00:09  reason=unknown_mac  watcher_id=w1"
    )


def test_event_line_claims_observed_has_the_capture_time_in_nanoseconds() -> None:
    claim = {
        "claim_id": "6f1c0e0a-4e0c-4a59-9a55-1b7f3c2d9e01",
        "vlan": None,
        "kind": "garp_request",
        "sender_mac": "02:00:00:00:00:01",
        "eth_src": "02:00:00:00:00:01",
        "sender_ip": "10.0.0.4",
        "target_ip": "10.0.0.4",
        "captured_at": 1_764_138_450_123_456_789,
    }
    line = render.event_line(
        envelope("arp.claims.observed", {"watcher_id": "w1", "interface": "eth0", "claims": [claim]})
    )
    assert line.endswith(
        "1 claim  watcher_id=w1  interface=eth0  "
        "[10.0.0.4 is-at 02:00:00:00:00:01  kind=garp_request  captured=2025-11-26 06:27:30.123456789Z]"
    )
    spoofed = {**claim, "eth_src": "02:00:00:00:00:66", "vlan": 7, "repeats": 4}
    many = render.event_line(
        envelope("arp.claims.observed", {"watcher_id": "w1", "interface": "eth0", "claims": [spoofed] * 5})
    )
    assert "5 claims" in many
    assert "kind=garp_request  vlan=7  eth_src=02:00:00:00:00:66  repeats=4" in many
    assert many.count("is-at") == render.CLAIMS_SHOWN
    assert many.endswith("(+2 more)")


def test_event_line_conditions_and_eip() -> None:
    flapping = {"havip_id": "h", "address": "10.0.0.4", "transitions_in_window": 6, "claimants_in_window": 2}
    line = render.event_line(envelope("havip.flapping.started", flapping))
    assert line.endswith("10.0.0.4  havip_id=h  transitions_in_window=6  claimants_in_window=2")
    eip = render.event_line(envelope("havip.eip.associated", {"havip_id": "h", "eip": "203.0.113.5"}))
    assert eip.endswith("havip.eip.associated       203.0.113.5  havip_id=h")


def test_event_line_of_an_unknown_or_broken_event_never_fails() -> None:
    assert render.event_line(envelope("x.new", {"a": 1})).endswith('x.new                      {"a":1}')
    assert render.event_line({}).split() == ["-", "?", "-"]
    assert render.event_line({"type": "vpc.created", "data": "oops"}).endswith("vpc.created                oops")
    assert render.event_line(envelope("vpc.created", {})).endswith("vpc -")
    assert "\x1b" not in render.event_line(envelope("vpc.created", {"id": "v", "name": "\x1b[2J"}))
