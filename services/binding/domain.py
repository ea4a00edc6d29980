"""The binding decision (docs/contract.md#binding-rules), pure: no I/O, no clock of its own.

`BindingBook` holds the inventory (instances and HAVIPs, projected from the allocator's events) and the
current binding of every HAVIP. Each input returns the outcome the adapters must persist and publish; the book
is updated as if that outcome were committed (the service reloads the book if the commit fails).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Literal

from shared.events import DEFAULT_SEGMENT, ReleaseCause

RejectReason = Literal["unknown_mac", "other_subnet", "not_candidate", "eth_mismatch", "clock_skew"]

# A holder's refresh is written at most this often per HAVIP (docs/contract.md#refresh).
REFRESH_WRITE_INTERVAL_NS = 1_000_000_000
# A claim captured further ahead of the binding service's clock than this is refused (docs/contract.md#clock-skew):
# a watcher whose clock runs ahead would otherwise make every other watcher's claims look stale.
DEFAULT_MAX_CLOCK_SKEW_NS = 2_000_000_000
# No claim can be older than the system (2020-01-01): a watcher whose clock is that far behind is refused too.
EPOCH_NS = 1_577_836_800_000_000_000


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


@dataclass(frozen=True, slots=True)
class Claim:
    address: IPv4Address
    sender_mac: str
    eth_src: str
    captured_ns: int
    watcher_id: str
    segment: str = DEFAULT_SEGMENT  # where it was seen: the watcher's segment …
    vlan: int | None = None  # … and the frame's VLAN tag


@dataclass(frozen=True, slots=True)
class Attachment:
    """Where a subnet's HAVIPs can be claimed (docs/contract.md#segments): a segment, and a VLAN of it (none: all
    of it)."""

    segment: str = DEFAULT_SEGMENT
    vlan: int | None = None

    def sees(self, claim: Claim) -> bool:
        return claim.segment == self.segment and (self.vlan is None or self.vlan == claim.vlan)


# A subnet the book has no attachment for (no subnet event seen) is on the default segment, all VLANs: a
# single-segment deployment needs no configuration.
UNATTACHED = Attachment()


@dataclass(frozen=True, slots=True)
class Instance:
    id: uuid.UUID
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    mac: str
    private_ip: IPv4Address


@dataclass(frozen=True, slots=True)
class Havip:
    id: uuid.UUID
    vpc_id: uuid.UUID
    subnet_id: uuid.UUID
    address: IPv4Address
    candidates: frozenset[uuid.UUID] = frozenset()


@dataclass(slots=True)
class Binding:
    havip_id: uuid.UUID
    address: IPv4Address
    instance_id: uuid.UUID | None = None
    mac: str | None = None
    sequence: int = 0
    last_claim_ns: int = 0
    last_seen_written_ns: int = 0
    last_transition_at: datetime | None = None
    flapping: bool = False
    split_brain: bool = False


@dataclass(frozen=True, slots=True)
class Holder:
    instance_id: uuid.UUID
    mac: str


# ---- outcomes --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotAHavip:
    """The address is no HAVIP: counted, not stored."""


@dataclass(frozen=True, slots=True)
class Rejected:
    havip_id: uuid.UUID | None
    reason: RejectReason


@dataclass(frozen=True, slots=True)
class Stale:
    """Older than (or as old as) the last claim applied to this HAVIP: changes nothing."""

    havip_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Refreshed:
    havip_id: uuid.UUID
    write: bool  # False while the last write of last_seen_at is under a second old


@dataclass(frozen=True, slots=True)
class Transition:
    havip_id: uuid.UUID
    address: IPv4Address
    previous: Holder | None
    current: Holder | None
    sequence: int
    reason: Literal["claim", "release"]
    captured_ns: int | None
    watcher_id: str | None
    cause: ReleaseCause | None = None  # a release's cause; None for a claim


ClaimOutcome = NotAHavip | Rejected | Stale | Refreshed | Transition

Condition = Literal["flapping", "split_brain"]


@dataclass(frozen=True, slots=True)
class ConditionPolicy:
    """When a HAVIP is flapping or in split brain (docs/contract.md#flapping, #split-brain).

    Flapping: more than `flap_transitions` transitions by claim within `flap_window_ns`. Split brain: the
    authorised claimant changed at least `split_changes` times within `split_window_ns` (A, B, A, B: two
    masters both announcing, or both answering ARP requests for the address); a single failover, even one
    followed by a preemption (A, B, A), is not. Either ends when a whole window passed without what started
    it ("quiet again").
    """

    flap_transitions: int = 5
    flap_window_ns: int = 60_000_000_000
    split_changes: int = 3
    split_window_ns: int = 10_000_000_000


@dataclass(frozen=True, slots=True)
class ConditionEdge:
    havip_id: uuid.UUID
    address: IPv4Address
    condition: Condition
    started: bool
    transitions_in_window: int
    claimants_in_window: int


@dataclass(slots=True)
class _Activity:
    """Recent claims of one HAVIP, enough to tell flapping and split brain (bounded by the windows)."""

    transitions: deque[int] = field(default_factory=deque)  # capture times of transitions by claim
    changes: deque[int] = field(default_factory=deque)  # capture times at which the claimant changed
    claimants: dict[str, int] = field(default_factory=dict)  # authorised MAC -> its last claim's time
    last_claimant: str | None = None


def _prune(times: deque[int], cutoff: int) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


@dataclass
class BindingBook:
    instances_by_id: dict[uuid.UUID, Instance] = field(default_factory=dict)
    instances_by_mac: dict[str, Instance] = field(default_factory=dict)
    havips_by_id: dict[uuid.UUID, Havip] = field(default_factory=dict)
    # Addresses are unique within a VPC only: VPCs may overlap.
    havips_by_address: dict[IPv4Address, list[Havip]] = field(default_factory=dict)
    bindings: dict[uuid.UUID, Binding] = field(default_factory=dict)
    # Ids the allocator removed: never brought back by a redelivered creation (ids are never reused).
    released: set[uuid.UUID] = field(default_factory=set)
    deregistered: set[uuid.UUID] = field(default_factory=set)
    attachments: dict[uuid.UUID, Attachment] = field(default_factory=dict)  # by subnet id
    policy: ConditionPolicy = field(default_factory=ConditionPolicy)
    _activity: dict[uuid.UUID, _Activity] = field(default_factory=dict)
    _flagged: set[uuid.UUID] = field(default_factory=set)  # HAVIPs flapping or in split brain
    _edges: list[ConditionEdge] = field(default_factory=list)
    # HAVIPs the last `load` found with no binding row yet: created by the first write of their partition's
    # decider (a replica creates the rows of its own partitions only).
    rowless: set[uuid.UUID] = field(default_factory=set)

    # ---- inventory -----------------------------------------------------------------------------------------

    def put_instance(self, instance: Instance) -> bool:
        """Add or update an instance; False (and nothing changes) if it was deregistered: a registration
        redelivered after its deregistration must not bring it back."""
        if instance.id in self.deregistered:
            return False
        old = self.instances_by_id.get(instance.id)
        if old is not None:
            self.instances_by_mac.pop(old.mac, None)
        self.instances_by_id[instance.id] = instance
        self.instances_by_mac[instance.mac] = instance
        return True

    def remove_instance(self, instance_id: uuid.UUID) -> list[Transition]:
        """Deregistration: every HAVIP the instance holds becomes UNBOUND (docs/contract.md#release)."""
        self.deregistered.add(instance_id)
        instance = self.instances_by_id.pop(instance_id, None)
        if instance is None:
            return []
        self.instances_by_mac.pop(instance.mac, None)
        return [
            self._release(binding, "instance_deregistered")
            for binding in self.bindings.values()
            if binding.instance_id == instance_id
        ]

    def put_havip(self, havip: Havip) -> Literal["new", "updated", "released"]:
        """Add or update a HAVIP: "new" (its binding row must be created), "updated", or "released" — it was
        released before (an allocation or update redelivered after the release): nothing changes."""
        if havip.id in self.released:
            return "released"
        old = self.havips_by_id.get(havip.id)
        if old is not None:
            self._unindex(old)
        self.havips_by_id[havip.id] = havip
        self.havips_by_address.setdefault(havip.address, []).append(havip)
        if havip.id in self.bindings:
            return "updated"
        self.bindings[havip.id] = Binding(havip.id, havip.address)
        return "new"

    def release_unless_candidate(self, havip_id: uuid.UUID) -> Transition | None:
        """A candidate list that no longer includes the holder releases the binding (docs/contract.md#release)."""
        havip = self.havips_by_id.get(havip_id)
        binding = self.bindings.get(havip_id)
        if havip is None or binding is None or binding.instance_id is None or not havip.candidates:
            return None
        if binding.instance_id in havip.candidates:
            return None
        return self._release(binding, "candidates_changed")

    def remove_havip(self, havip_id: uuid.UUID) -> Transition | None:
        """Release: the binding ends with a final history row; None if the HAVIP was unknown."""
        self.released.add(havip_id)
        havip = self.havips_by_id.pop(havip_id, None)
        if havip is not None:
            self._unindex(havip)
        binding = self.bindings.pop(havip_id, None)
        if binding is None:
            self._activity.pop(havip_id, None)
            self._flagged.discard(havip_id)
            return None
        return self._release(binding, "released")

    def _release(self, binding: Binding, cause: ReleaseCause) -> Transition:
        """End a binding without a claim. Its flags end with it, and say so: a consumer pairing
        the edges must not keep the HAVIP flagged forever; what made them (the claims so far) is forgotten."""
        activity = self._activity.pop(binding.havip_id, None) or _Activity()
        ended: list[Condition] = []
        if binding.flapping:
            binding.flapping = False
            ended.append("flapping")
        if binding.split_brain:
            binding.split_brain = False
            ended.append("split_brain")
        for condition in ended:
            self._edges.append(
                ConditionEdge(
                    binding.havip_id,
                    binding.address,
                    condition,
                    False,
                    len(activity.transitions),
                    len(activity.claimants),
                )
            )
        self._flagged.discard(binding.havip_id)
        return self._move(binding, None, "release", None, None, cause)

    def _unindex(self, havip: Havip) -> None:
        same = [h for h in self.havips_by_address.get(havip.address, []) if h.id != havip.id]
        if same:
            self.havips_by_address[havip.address] = same
        else:
            self.havips_by_address.pop(havip.address, None)

    def load(
        self,
        instances: Iterable[Instance],
        havips: Iterable[Havip],
        bindings: Iterable[Binding],
        released: Iterable[uuid.UUID] = (),
        deregistered: Iterable[uuid.UUID] = (),
    ) -> None:
        self.released.update(released)
        self.deregistered.update(deregistered)
        for instance in instances:
            self.put_instance(instance)
        for binding in bindings:
            self.bindings[binding.havip_id] = binding
        for havip in havips:
            if self.put_havip(havip) == "new":
                self.rowless.add(havip.id)

    def replace_bindings(self, taken: Callable[[IPv4Address], bool], bindings: Iterable[Binding]) -> list[Binding]:
        """The bindings of the partitions `taken` tells, as read from Postgres (another replica decided them until
        now): they replace this book's, whose recent claims are forgotten with them. A HAVIP of these partitions
        with no row yet gets a fresh binding (`rowless`). Returns the bindings now in the book for them."""
        for havip_id, binding in list(self.bindings.items()):
            if taken(binding.address):
                del self.bindings[havip_id]
                self._activity.pop(havip_id, None)
                self._flagged.discard(havip_id)
        placed = []
        for binding in bindings:
            self.bindings[binding.havip_id] = binding
            self.rowless.discard(binding.havip_id)
            placed.append(binding)
        for havip in self.havips_by_id.values():
            if havip.id not in self.bindings and taken(havip.address):
                binding = self.bindings[havip.id] = Binding(havip.id, havip.address)
                self.rowless.add(havip.id)
                placed.append(binding)
        return placed

    def strays(self, owns: Callable[[IPv4Address], bool]) -> list[Transition]:
        """After a load, in the partitions `owns` tells: the bindings that inventory changes decided while no
        replica decided their partition should have ended — their HAVIP released, their holder deregistered or no
        longer a candidate (docs/contract.md#release). Ends them (the transitions to write) and forgets them."""
        ended: list[Transition] = []
        for havip_id, binding in list(self.bindings.items()):
            if not owns(binding.address):
                continue
            if havip_id not in self.havips_by_id:  # released (a binding row outlived its HAVIP)
                final = self.remove_havip(havip_id)
                if final is not None:
                    ended.append(final)
            elif binding.instance_id is not None and binding.instance_id not in self.instances_by_id:
                ended.append(self._release(binding, "instance_deregistered"))
            else:
                released = self.release_unless_candidate(havip_id)
                if released is not None:
                    ended.append(released)
        return ended

    # ---- claims --------------------------------------------------------------------------------------------

    def attach_subnet(self, subnet_id: uuid.UUID, attachment: Attachment) -> None:
        self.attachments[subnet_id] = attachment

    def detach_subnet(self, subnet_id: uuid.UUID) -> None:
        self.attachments.pop(subnet_id, None)

    def authorise(self, claim: Claim) -> tuple[Havip, Instance] | Rejected | NotAHavip:
        """Authorisation (docs/contract.md#authorisation): which HAVIP the claim is for, and whether the claimant
        may hold it. Only HAVIPs of the subnets attached to the claim's segment are candidates
        (docs/contract.md#segments): elsewhere, the address is another's."""
        havips = self.havips_by_address.get(claim.address)
        if not havips:
            return NotAHavip()
        attachments = self.attachments
        if attachments:
            havips = [h for h in havips if attachments.get(h.subnet_id, UNATTACHED).sees(claim)]
        elif not UNATTACHED.sees(claim):
            havips = []
        if not havips:
            return NotAHavip()  # counted, not stored
        instance = self.instances_by_mac.get(claim.sender_mac)
        # The HAVIP meant: the one in the claimant's VPC, else the only one with this address.
        havip = next((h for h in havips if instance is not None and h.vpc_id == instance.vpc_id), None)
        if havip is None and len(havips) == 1:
            havip = havips[0]
        havip_id = havip.id if havip is not None else None
        if claim.eth_src != claim.sender_mac:
            return Rejected(havip_id, "eth_mismatch")
        if instance is None:
            return Rejected(havip_id, "unknown_mac")
        if havip is None or havip.subnet_id != instance.subnet_id:
            return Rejected(havip_id, "other_subnet")
        if havip.candidates and instance.id not in havip.candidates:
            return Rejected(havip_id, "not_candidate")
        return havip, instance

    def apply_claim(
        self, claim: Claim, *, now_ns: int | None = None, max_skew_ns: int = DEFAULT_MAX_CLOCK_SKEW_NS
    ) -> ClaimOutcome:
        """Decide a claim; `now_ns` is the binding service's clock (the book has none of its own)."""
        verdict = self.authorise(claim)
        if isinstance(verdict, Rejected | NotAHavip):
            return verdict
        havip, instance = verdict
        if claim.captured_ns < EPOCH_NS or (now_ns is not None and claim.captured_ns > now_ns + max_skew_ns):
            return Rejected(havip.id, "clock_skew")
        binding = self.bindings[havip.id]
        if claim.captured_ns <= binding.last_claim_ns:
            return Stale(havip.id)
        binding.last_claim_ns = claim.captured_ns
        activity = self._activity.get(havip.id)
        if activity is None:
            activity = self._activity[havip.id] = _Activity()
        if activity.last_claimant is not None and activity.last_claimant != instance.mac:
            activity.changes.append(claim.captured_ns)
        activity.last_claimant = instance.mac
        activity.claimants[instance.mac] = claim.captured_ns
        if binding.instance_id == instance.id:
            write = claim.captured_ns - binding.last_seen_written_ns >= REFRESH_WRITE_INTERVAL_NS
            if write:
                binding.last_seen_written_ns = claim.captured_ns
            flags_changed = self._evaluate(binding, activity, claim.captured_ns)
            return Refreshed(havip.id, write or flags_changed)
        binding.last_seen_written_ns = claim.captured_ns
        activity.transitions.append(claim.captured_ns)
        moved = self._move(
            binding, Holder(instance.id, instance.mac), "claim", claim.captured_ns, claim.watcher_id
        )
        self._evaluate(binding, activity, claim.captured_ns)
        return moved

    # ---- flapping and split brain --------------------------------------------------------------------------

    def _evaluate(self, binding: Binding, activity: _Activity, now_ns: int) -> bool:
        """Update the HAVIP's flags at `now_ns`; True if one of them changed (an edge was recorded)."""
        policy = self.policy
        _prune(activity.transitions, now_ns - policy.flap_window_ns)
        _prune(activity.changes, now_ns - policy.split_window_ns)
        cutoff = now_ns - policy.split_window_ns
        if any(t <= cutoff for t in activity.claimants.values()):
            activity.claimants = {mac: t for mac, t in activity.claimants.items() if t > cutoff}
        flapping = len(activity.transitions) > policy.flap_transitions or (
            binding.flapping and bool(activity.transitions)
        )
        split_brain = len(activity.changes) >= policy.split_changes or (
            binding.split_brain and bool(activity.changes)
        )
        edges: list[tuple[Condition, bool]] = []
        if flapping != binding.flapping:
            binding.flapping = flapping
            edges.append(("flapping", flapping))
        if split_brain != binding.split_brain:
            binding.split_brain = split_brain
            edges.append(("split_brain", split_brain))
        for condition, started in edges:
            self._edges.append(
                ConditionEdge(
                    binding.havip_id,
                    binding.address,
                    condition,
                    started,
                    len(activity.transitions),
                    len(activity.claimants),
                )
            )
        if binding.flapping or binding.split_brain:
            self._flagged.add(binding.havip_id)
        else:
            self._flagged.discard(binding.havip_id)
        return bool(edges)

    def tick(self, now_ns: int) -> None:
        """Let time pass (the service's clock): flagged HAVIPs that have been quiet for a window end their
        condition. Edges are collected for `take_edges`."""
        for havip_id in list(self._flagged):
            binding = self.bindings.get(havip_id)
            activity = self._activity.get(havip_id)
            if binding is None or activity is None:
                self._flagged.discard(havip_id)
                continue
            self._evaluate(binding, activity, now_ns)

    def hold_conditions(self, now_ns: int, bindings: Iterable[Binding] | None = None) -> None:
        """After a restart (or for `bindings` just read): a HAVIP stored as flapping or in split brain stays so
        until a window from now passed quietly (the history of claims that set the flag is not kept)."""
        for binding in self.bindings.values() if bindings is None else bindings:
            if binding.flapping or binding.split_brain:
                activity = self._activity.setdefault(binding.havip_id, _Activity())
                if binding.flapping:
                    activity.transitions.append(now_ns)
                if binding.split_brain:
                    activity.changes.append(now_ns)
                self._flagged.add(binding.havip_id)

    def take_edges(self) -> list[ConditionEdge]:
        """The condition edges since the last call (the adapters persist the flags and publish them)."""
        edges, self._edges = self._edges, []
        return edges

    @staticmethod
    def _move(
        binding: Binding,
        to: Holder | None,
        reason: Literal["claim", "release"],
        captured_ns: int | None,
        watcher_id: str | None,
        cause: ReleaseCause | None = None,
    ) -> Transition:
        previous = (
            Holder(binding.instance_id, binding.mac)
            if binding.instance_id is not None and binding.mac is not None
            else None
        )
        binding.sequence += 1
        binding.instance_id = to.instance_id if to else None
        binding.mac = to.mac if to else None
        return Transition(
            havip_id=binding.havip_id,
            address=binding.address,
            previous=previous,
            current=to,
            sequence=binding.sequence,
            reason=reason,
            captured_ns=captured_ns,
            watcher_id=watcher_id,
            cause=cause,
        )
