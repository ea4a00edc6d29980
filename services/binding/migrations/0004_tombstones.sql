-- HAVIPs released and instances deregistered, kept so that a creation event redelivered after its removal
-- (a lost acknowledgement) cannot bring them back. The allocator never reuses an id.
CREATE TABLE released_havips (
    id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE deregistered_instances (
    id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
