-- The allocator's own read model of the binding service's state (SPEC §3: never the binding's tables), kept
-- from its events by services/allocator/binding_view: havip.binding.changed / .replayed, havip.claim.rejected,
-- havip.flapping.*, havip.split_brain.*. No foreign key to havips: the history outlives a released HAVIP.

-- Each HAVIP's binding as the newest transition applied tells it, and its condition flags.
CREATE TABLE view_bindings (
    havip_id uuid PRIMARY KEY,
    sequence bigint NOT NULL DEFAULT 0 CHECK (sequence >= 0),  -- of the newest transition applied
    instance_id uuid,
    mac macaddr,
    last_transition_at timestamptz,
    last_seen_at timestamptz,
    flapping boolean NOT NULL DEFAULT false,
    flapping_changed_at timestamptz,  -- the binding's time of the newest edge applied: older edges are stale
    split_brain boolean NOT NULL DEFAULT false,
    split_brain_changed_at timestamptz,
    -- sequences below `sequence` not (yet) in view_transitions: a gap, repaired by asking for a replay
    missing int8multirange NOT NULL DEFAULT '{}',
    gap_since timestamptz,
    repair_requested_at timestamptz,
    repair_attempts integer NOT NULL DEFAULT 0,  -- replays asked for since the history was last complete
    CHECK ((instance_id IS NULL) = (mac IS NULL)),
    CHECK ((gap_since IS NULL) = isempty(missing))
);
CREATE INDEX view_bindings_gaps ON view_bindings (gap_since) WHERE gap_since IS NOT NULL;

-- Every transition, forever (the binding's history as its events told it).
CREATE TABLE view_transitions (
    havip_id uuid NOT NULL,
    sequence bigint NOT NULL CHECK (sequence >= 1),
    from_instance_id uuid,
    to_instance_id uuid,
    mac macaddr,
    captured_at timestamptz,
    committed_at timestamptz NOT NULL,  -- the binding service's commit
    watcher_id text,
    reason text NOT NULL CHECK (reason IN ('claim', 'release')),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),  -- when this view took it
    PRIMARY KEY (havip_id, sequence)
);

-- The audit of refused claims; a redelivered event is recognised by its id.
CREATE TABLE view_refusals (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    havip_id uuid,
    address inet NOT NULL,
    mac macaddr NOT NULL,
    reason text NOT NULL,
    captured_at timestamptz NOT NULL,
    watcher_id text NOT NULL,
    count bigint NOT NULL CHECK (count >= 1),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX view_refusals_havip ON view_refusals (havip_id, id DESC);
CREATE INDEX view_refusals_recorded_at ON view_refusals (recorded_at);

-- One row once the view has asked for its starting point (at the allocator's first start): the newest
-- transition of every HAVIP the binding service knows, for a deployment that had bindings before the view.
CREATE TABLE view_seed (
    seeded boolean PRIMARY KEY CHECK (seeded),
    requested_at timestamptz NOT NULL DEFAULT now()
);
