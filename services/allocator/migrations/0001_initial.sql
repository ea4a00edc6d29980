-- The allocator's inventory: VPCs, subnets, registered instances (network interfaces) and HAVIPs.
-- The runner sets search_path to this service's schema, so names are unqualified here.
--
-- The allocator serialises changes with transaction-scoped advisory locks (per VPC and per subnet); the
-- constraints below are the safety net should that ever be bypassed. Foreign keys never cascade: deleting a
-- resource that is still referenced fails (the API answers 409).
-- Host addresses are inet with a /32 mask (inet equality includes the mask); blocks are cidr.

CREATE TABLE vpcs (
    id uuid PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    cidr cidr NOT NULL CHECK (family(cidr) = 4 AND masklen(cidr) BETWEEN 8 AND 29),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vpcs_page ON vpcs (created_at, id);

CREATE TABLE subnets (
    id uuid PRIMARY KEY,
    vpc_id uuid NOT NULL REFERENCES vpcs (id),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    cidr cidr NOT NULL CHECK (family(cidr) = 4 AND masklen(cidr) BETWEEN 8 AND 29),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- target of the composite foreign keys below: a child's vpc_id always matches its subnet's
    UNIQUE (id, vpc_id),
    UNIQUE (vpc_id, cidr)
);
CREATE INDEX subnets_page ON subnets (created_at, id);

CREATE TABLE instances (
    id uuid PRIMARY KEY,
    vpc_id uuid NOT NULL,
    subnet_id uuid NOT NULL,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    private_ip inet NOT NULL CHECK (family(private_ip) = 4 AND masklen(private_ip) = 32),
    mac macaddr NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT instances_subnet_fkey FOREIGN KEY (subnet_id, vpc_id) REFERENCES subnets (id, vpc_id),
    CONSTRAINT instances_private_ip_key UNIQUE (vpc_id, private_ip),
    CONSTRAINT instances_mac_key UNIQUE (mac)
);
CREATE INDEX instances_subnet ON instances (subnet_id);
CREATE INDEX instances_page ON instances (created_at, id);

CREATE TABLE havips (
    id uuid PRIMARY KEY,
    vpc_id uuid NOT NULL,
    subnet_id uuid NOT NULL,
    name text CHECK (length(name) BETWEEN 1 AND 64),
    address inet NOT NULL CHECK (family(address) = 4 AND masklen(address) = 32),
    -- allow-list of instance ids (at most 10); empty = any instance of the subnet
    candidates uuid[] NOT NULL DEFAULT '{}' CHECK (cardinality(candidates) <= 10),
    eip inet CHECK (family(eip) = 4 AND masklen(eip) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT havips_subnet_fkey FOREIGN KEY (subnet_id, vpc_id) REFERENCES subnets (id, vpc_id),
    CONSTRAINT havips_address_key UNIQUE (vpc_id, address),
    CONSTRAINT havips_eip_key UNIQUE (eip)
);
CREATE INDEX havips_subnet ON havips (subnet_id);
CREATE INDEX havips_page ON havips (created_at, id);
CREATE INDEX havips_candidates ON havips USING gin (candidates);

-- Idempotency-Key of POST /v1/havips: a retry with the same key and body returns the same HAVIP.
-- Kept after the HAVIP is released (no foreign key), so a late retry cannot allocate a second one.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 64),
    request_hash text NOT NULL,
    havip_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox (shared/outbox.py).
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    routing_key text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
