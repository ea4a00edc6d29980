-- Each subnet is attached to a layer-2 segment, and optionally to one VLAN of it (SPEC §4): the binding service
-- decides a claim only against the HAVIPs of the subnets on the segment it was seen on. Existing subnets, and
-- subnets created without saying, are on the default segment (one segment needs no configuration).
ALTER TABLE subnets
    ADD COLUMN segment text NOT NULL DEFAULT 'default' CHECK (segment ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    ADD COLUMN vlan integer CHECK (vlan BETWEEN 1 AND 4094);
