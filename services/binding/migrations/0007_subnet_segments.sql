-- Where each subnet's HAVIPs can be claimed (SPEC §4): a claim is decided only against the HAVIPs of the subnets
-- attached to the segment (and VLAN) it was seen on. Projected from subnet.created / subnet.deleted; a subnet
-- with no row here is on the default segment, all VLANs.
CREATE TABLE subnets (
    id uuid PRIMARY KEY,
    segment text NOT NULL,
    vlan integer CHECK (vlan BETWEEN 1 AND 4094)
);
