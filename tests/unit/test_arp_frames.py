"""Parsing Ethernet/ARP frames: examples, then fuzzing (docs/contract.md#reliability R4: malformed frames never
crash the watcher)."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.arp_watcher.claims import claim_from_frame
from services.arp_watcher.coalesce import Coalescer
from services.arp_watcher.frames import (
    ARP_REPLY,
    ARP_REQUEST,
    MALFORMED_REASONS,
    MAX_VLAN_TAGS,
    ArpFrame,
    FrameError,
    MalformedFrame,
    NotArp,
    parse_frame,
)
from tests.lab.arp_frames import build_arp_frame

T0 = 1_700_000_000_000_000_000
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("0200000000bb")
VIP = int(IPv4Address("192.0.2.10"))
OTHER = int(IPv4Address("192.0.2.20"))


def garp(**overrides: object) -> bytes:
    fields: dict[str, object] = {"oper": ARP_REQUEST, "sender_mac": MAC_A, "sender_ip": VIP, "target_ip": VIP}
    fields.update(overrides)
    return build_arp_frame(**fields)  # type: ignore[arg-type]


def test_gratuitous_request_is_parsed() -> None:
    frame = parse_frame(garp())
    assert frame == ArpFrame(
        eth_dst=b"\xff" * 6,
        eth_src=MAC_A,
        vlans=(),
        oper=ARP_REQUEST,
        sender_mac=MAC_A,
        sender_ip=VIP,
        target_mac=b"\x00" * 6,
        target_ip=VIP,
    )
    assert frame.vlan is None


def test_reply_is_parsed() -> None:
    data = build_arp_frame(
        oper=ARP_REPLY, sender_mac=MAC_A, sender_ip=VIP, target_ip=OTHER, target_mac=MAC_B, eth_dst=MAC_B
    )
    frame = parse_frame(data)
    assert (frame.oper, frame.eth_dst, frame.target_mac, frame.target_ip) == (ARP_REPLY, MAC_B, MAC_B, OTHER)


def test_minimal_unpadded_frame_is_enough() -> None:
    data = garp(pad_to=0)
    assert len(data) == 42
    assert parse_frame(data).sender_ip == VIP


def test_trailing_padding_and_fcs_are_ignored() -> None:
    assert parse_frame(garp() + b"\xde\xad\xbe\xef").sender_mac == MAC_A


def test_eth_src_differing_from_sender_mac_is_kept() -> None:
    frame = parse_frame(garp(eth_src=MAC_B))
    assert (frame.eth_src, frame.sender_mac) == (MAC_B, MAC_A)


def test_8021q_tag_in_frame() -> None:
    frame = parse_frame(garp(vlan_tags=((0x8100, 100),)))
    assert frame.vlans == (100,)
    assert frame.vlan == 100
    assert frame.sender_ip == VIP


def test_tag_priority_bits_are_not_part_of_the_vlan_id() -> None:
    data = bytearray(garp(vlan_tags=((0x8100, 100),)))
    data[14] |= 0xE0 | 0x10  # PCP 7, DEI 1
    assert parse_frame(bytes(data)).vlan == 100


def test_qinq_tags_in_frame_innermost_is_the_segment_vlan() -> None:
    frame = parse_frame(garp(vlan_tags=((0x88A8, 10), (0x8100, 200))))
    assert frame.vlans == (10, 200)
    assert frame.vlan == 200


def test_vlan_from_auxdata_when_the_kernel_stripped_the_tag() -> None:
    frame = parse_frame(garp(), aux_vlan=100)
    assert frame.vlans == (100,)
    assert frame.vlan == 100


def test_auxdata_tag_is_outer_to_a_tag_left_in_the_frame() -> None:
    frame = parse_frame(garp(vlan_tags=((0x8100, 200),)), aux_vlan=10)
    assert frame.vlans == (10, 200)
    assert frame.vlan == 200


def test_auxdata_tci_priority_bits_are_masked() -> None:
    assert parse_frame(garp(), aux_vlan=0xE064).vlan == 100


def test_non_arp_ethertype_is_not_arp() -> None:
    ipv4 = b"\xff" * 6 + MAC_A + b"\x08\x00" + b"\x45" + b"\x00" * 40
    with pytest.raises(NotArp) as info:
        parse_frame(ipv4)
    assert info.value.ethertype == 0x0800


def test_tagged_non_arp_is_not_arp() -> None:
    data = b"\xff" * 6 + MAC_A + struct.pack("!HHH", 0x8100, 100, 0x86DD) + b"\x00" * 40
    with pytest.raises(NotArp):
        parse_frame(data)


def test_8023_length_field_is_not_arp() -> None:
    with pytest.raises(NotArp):
        parse_frame(b"\x01\x80\xc2\x00\x00\x00" + MAC_A + b"\x00\x26" + b"\x42" * 46)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated_ethernet"),
        (b"\xff" * 13, "truncated_ethernet"),
        (b"\xff" * 12 + b"\x81\x00" + b"\x00", "truncated_vlan_tag"),
        (b"\xff" * 12 + b"\x08\x06", "truncated_arp"),
        (b"\xff" * 12 + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04", "truncated_arp"),
        (build_arp_frame(oper=1, sender_mac=MAC_A, sender_ip=VIP, target_ip=VIP, pad_to=0)[:41], "truncated_arp"),
        (
            build_arp_frame(
                oper=1, sender_mac=MAC_A, sender_ip=VIP, target_ip=VIP, vlan_tags=((0x8100, 1),), pad_to=0
            )[:45],
            "truncated_arp",
        ),
    ],
)
def test_truncated_frames(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(data)
    assert info.value.reason == reason


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (14, b"\x00\x06", "bad_htype"),  # IEEE 802 networks
        (16, b"\x86\xdd", "bad_ptype"),
        (18, b"\x08", "bad_hlen"),
        (18, b"\x00", "bad_hlen"),
        (19, b"\x10", "bad_plen"),
        (19, b"\x00", "bad_plen"),
    ],
)
def test_wrong_arp_header_fields(offset: int, value: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(_patch(garp(), offset, value))
    assert info.value.reason == reason
    assert str(info.value) == reason


def test_too_many_vlan_tags() -> None:
    tags = tuple((0x8100, i) for i in range(MAX_VLAN_TAGS + 1))
    with pytest.raises(MalformedFrame) as info:
        parse_frame(garp(vlan_tags=tags))
    assert info.value.reason == "too_many_vlan_tags"
    assert parse_frame(garp(vlan_tags=tags[:MAX_VLAN_TAGS])).vlans == tuple(range(MAX_VLAN_TAGS))


def test_not_bytes_is_malformed() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(bytearray(garp()))  # type: ignore[arg-type]
    assert info.value.reason == "not_bytes"


def test_unknown_opcode_is_parsed_not_rejected() -> None:
    assert parse_frame(garp(oper=9)).oper == 9  # InARP: well formed, the claim rule ignores it


def _check_parse(data: bytes, aux_vlan: int | None = None) -> None:
    """The contract: an ArpFrame, or a FrameError with a known reason; nothing else, ever."""
    try:
        frame = parse_frame(data, aux_vlan)
    except FrameError as exc:
        error: FrameError = exc
    else:
        assert len(frame.eth_dst) == len(frame.eth_src) == len(frame.sender_mac) == len(frame.target_mac) == 6
        assert 0 <= frame.sender_ip < 2**32
        assert 0 <= frame.target_ip < 2**32
        assert all(0 <= v <= 4095 for v in frame.vlans)
        return
    if isinstance(error, MalformedFrame):
        assert error.reason in MALFORMED_REASONS
    else:
        assert isinstance(error, NotArp)
        assert 0 <= error.ethertype <= 0xFFFF


@settings(max_examples=3000)
@given(st.binary(max_size=128), st.none() | st.integers(min_value=0, max_value=0xFFFF))
def test_fuzz_arbitrary_bytes(data: bytes, aux_vlan: int | None) -> None:
    _check_parse(data, aux_vlan)


VALID_FRAMES = [
    garp(),
    garp(pad_to=0),
    garp(vlan_tags=((0x8100, 100),)),
    garp(vlan_tags=((0x88A8, 10), (0x8100, 20))),
    build_arp_frame(oper=ARP_REPLY, sender_mac=MAC_A, sender_ip=VIP, target_ip=OTHER, target_mac=MAC_B),
]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        action = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if action == "flip":
            data[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "set":
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        elif action == "truncate":
            del data[pos:]
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(min_value=1, max_value=8))]
    return bytes(data)


@settings(max_examples=3000)
@given(mutated_frames(), st.none() | st.integers(min_value=0, max_value=0xFFFF))
def test_fuzz_mutated_valid_frames(data: bytes, aux_vlan: int | None) -> None:
    _check_parse(data, aux_vlan)


@given(
    oper=st.integers(min_value=0, max_value=0xFFFF),
    sender_mac=st.binary(min_size=6, max_size=6),
    eth_src=st.binary(min_size=6, max_size=6),
    sender_ip=st.integers(min_value=0, max_value=2**32 - 1),
    target_ip=st.integers(min_value=0, max_value=2**32 - 1),
    vids=st.lists(st.integers(min_value=0, max_value=4095), max_size=MAX_VLAN_TAGS),
)
def test_round_trip(
    oper: int, sender_mac: bytes, eth_src: bytes, sender_ip: int, target_ip: int, vids: list[int]
) -> None:
    data = build_arp_frame(
        oper=oper,
        sender_mac=sender_mac,
        eth_src=eth_src,
        sender_ip=sender_ip,
        target_ip=target_ip,
        vlan_tags=tuple((0x8100, v) for v in vids),
    )
    frame = parse_frame(data)
    assert (frame.oper, frame.sender_mac, frame.eth_src, frame.sender_ip, frame.target_ip) == (
        oper,
        sender_mac,
        eth_src,
        sender_ip,
        target_ip,
    )
    assert frame.vlans == tuple(vids)


def test_a_million_mutated_frames_never_escape_frame_error() -> None:
    """R4 (docs/contract.md#reliability) asks for ≥ 1,000,000 fuzzed frames: seeded random mutations (truncated,
    wrong lengths, odd hardware and protocol types, nested tags) and random bytes, through the parser, the claim
    rule and the coalescer — the whole per-frame path of the capture thread — quickly."""
    rng = random.Random(20240229)
    bases = [bytearray(f) for f in VALID_FRAMES]
    outcomes = {"claim": 0, "not_claim": 0, "malformed": 0, "not_arp": 0}
    coalescer = Coalescer()
    for i in range(1_000_000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 80))
        else:
            buf = bytearray(bases[i % len(bases)])
            for _ in range(1 + (i & 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            if i % 3 == 0:
                del buf[rng.randrange(len(buf)) :]
            elif i % 7 == 0:  # another tag in front, of any TPID
                buf[12:12] = rng.choice((b"\x81\x00", b"\x88\xa8", b"\x91\x00", rng.randbytes(2))) + rng.randbytes(
                    2
                )
            data = bytes(buf)
        try:
            frame = parse_frame(data, None if i & 1 else i & 0xFFFF)
        except MalformedFrame:
            outcomes["malformed"] += 1
            continue
        except NotArp:
            outcomes["not_arp"] += 1
            continue
        claim = claim_from_frame(frame, T0 + i)
        if claim is None:
            outcomes["not_claim"] += 1
        else:
            outcomes["claim"] += 1
            coalescer.admit([claim])
    assert sum(outcomes.values()) == 1_000_000
    assert all(outcomes.values())  # every outcome was exercised
    assert coalescer.coalesced < outcomes["claim"]


def test_frame_error_is_the_only_base() -> None:
    assert issubclass(MalformedFrame, FrameError)
    assert issubclass(NotArp, FrameError)
    assert not issubclass(NotArp, MalformedFrame)
