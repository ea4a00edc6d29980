-- The binding service's own tables. The allocator reads bindings, transitions and rejected_claims (read-only)
-- to show a HAVIP's state and history; nothing else outside this service touches them.

-- Projection of the allocator's inventory, kept from its events.
CREATE TABLE instances (
    id uuid PRIMARY KEY,
    vpc_id uuid NOT NULL,
    subnet_id uuid NOT NULL,
    mac macaddr NOT NULL UNIQUE,
    private_ip inet NOT NULL CHECK (masklen(private_ip) = 32)
);

CREATE TABLE havips (
    id uuid PRIMARY KEY,
    vpc_id uuid NOT NULL,
    subnet_id uuid NOT NULL,
    address inet NOT NULL CHECK (masklen(address) = 32),
    candidates uuid[] NOT NULL DEFAULT '{}'
);
CREATE INDEX havips_address ON havips (address);

-- Current holder of each HAVIP; one row from allocation until release.
CREATE TABLE bindings (
    havip_id uuid PRIMARY KEY,
    address inet NOT NULL CHECK (masklen(address) = 32),
    instance_id uuid,
    mac macaddr,
    sequence bigint NOT NULL DEFAULT 0,
    -- kernel capture time (ns) of the newest claim applied: older claims are stale
    last_claim_ns bigint NOT NULL DEFAULT 0,
    last_transition_at timestamptz,
    last_seen_at timestamptz,
    flapping boolean NOT NULL DEFAULT false,
    split_brain boolean NOT NULL DEFAULT false,
    CHECK ((instance_id IS NULL) = (mac IS NULL))
);

-- Every change of holder, forever.
CREATE TABLE transitions (
    havip_id uuid NOT NULL,
    sequence bigint NOT NULL CHECK (sequence >= 1),
    from_instance_id uuid,
    to_instance_id uuid,
    mac macaddr,
    captured_at timestamptz,
    captured_ns bigint,
    committed_at timestamptz NOT NULL,
    watcher_id text,
    reason text NOT NULL CHECK (reason IN ('claim', 'release')),
    PRIMARY KEY (havip_id, sequence)
);

-- Audit of refused claims.
CREATE TABLE rejected_claims (
    id bigserial PRIMARY KEY,
    havip_id uuid,
    address inet NOT NULL,
    mac macaddr NOT NULL,
    reason text NOT NULL CHECK (reason IN ('unknown_mac', 'other_subnet', 'not_candidate', 'eth_mismatch')),
    captured_at timestamptz NOT NULL,
    watcher_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rejected_claims_havip ON rejected_claims (havip_id, id DESC);

CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    routing_key text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
