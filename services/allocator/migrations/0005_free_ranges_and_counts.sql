-- Allocation in constant time, whatever the fill: two pieces of derived data that the database keeps in step
-- with the rows, so that allocating reads neither every taken address of the subnet (to find the lowest free
-- one) nor every HAVIP of the VPC (to count it against the quota), as it used to.
--
-- 1. free_ranges: the free addresses of every subnet, as disjoint ranges.
-- 2. subnet_havip_counts: how many HAVIPs each subnet holds (the quota sums them per VPC).
--
-- ---- 1. free ranges ------------------------------------------------------------------------------------------
--
-- free_ranges holds, for each subnet, the usable addresses (network address, gateway and broadcast excluded)
-- that no HAVIP and no instance holds, as maximal runs [lo, hi] of IPv4 addresses taken as integers
-- (address - 0.0.0.0). It is derived data, like an index: triggers keep it in step with havips and instances
-- in the same transaction, whoever writes them (the API, a bulk INSERT, a test), so it cannot drift.
--
--   * the lowest free address: the first range by (subnet_id, hi) — ranges are disjoint, so ordering by hi
--     orders by lo too;
--   * is an address free: the first range with hi >= address, and lo <= address;
--   * taking the lowest address shrinks its range from below (UPDATE of lo only: the key does not change, so
--     it is a HOT update that touches no index);
--   * taking an address inside a range splits it; giving one back merges it with its neighbours.
--
-- Concurrency: the allocator serialises every change of a subnet's addresses with the subnet's advisory lock
-- (services/allocator/database.py). The triggers also lock the ranges they consume (FOR UPDATE) and refuse an
-- address that no free range holds, so that even a writer that bypasses the lock cannot take an address twice
-- (a HAVIP's address that an instance holds, or the other way round).
--
-- Addresses never change in place (release and allocate instead): an UPDATE of a HAVIP's address or an
-- instance's private_ip or subnet is refused.
--
-- Function bodies name the schema: they run with the caller's search_path, not the migration's.

CREATE TABLE free_ranges (
    -- derived rows: they go with their subnet (which can only be deleted once it holds nothing)
    subnet_id uuid NOT NULL REFERENCES subnets (id) ON DELETE CASCADE,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    CHECK (lo <= hi),
    PRIMARY KEY (subnet_id, hi)
) WITH (fillfactor = 50);  -- room on the page for the HOT updates of lo

-- The usable addresses of a block, as integers: network + 2 (after the gateway) … broadcast - 1.
CREATE FUNCTION usable_first(block cidr) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (network(block) - '0.0.0.0'::inet) + 2;

CREATE FUNCTION usable_last(block cidr) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (broadcast(block) - '0.0.0.0'::inet) - 1;

-- One address out of the free ranges: the path of every API allocation and registration (a one-row INSERT),
-- in short statements whose plans PL/pgSQL keeps: a locked probe, then one update (the common case, the
-- lowest address of a range: a HOT update of lo), a delete, or a split.
CREATE FUNCTION take_address(taken_subnet uuid, a bigint) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    range_lo bigint;
    range_hi bigint;
BEGIN
    SELECT f.lo, f.hi INTO range_lo, range_hi FROM allocator.free_ranges f
    WHERE f.subnet_id = taken_subnet AND f.hi >= a
    ORDER BY f.hi LIMIT 1
    FOR UPDATE;
    IF NOT FOUND OR range_lo > a THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            CONSTRAINT = 'free_ranges_address_free',
            MESSAGE = format('address %s of subnet %s is not free', '0.0.0.0'::inet + a, taken_subnet);
    END IF;
    IF range_lo = range_hi THEN
        DELETE FROM allocator.free_ranges WHERE subnet_id = taken_subnet AND hi = range_hi;
    ELSIF a = range_hi THEN
        UPDATE allocator.free_ranges SET hi = a - 1 WHERE subnet_id = taken_subnet AND hi = range_hi;
    ELSE  -- the lowest address of the range, or one inside it (then the part below becomes a range of its own)
        UPDATE allocator.free_ranges SET lo = a + 1 WHERE subnet_id = taken_subnet AND hi = range_hi;
        IF a > range_lo THEN
            INSERT INTO allocator.free_ranges (subnet_id, lo, hi) VALUES (taken_subnet, range_lo, a - 1);
        END IF;
    END IF;
END
$$;

-- One address back into the free ranges, merged with the free neighbours on either side (the path of every
-- API release and deregistration).
CREATE FUNCTION give_back_address(freed_subnet uuid, a bigint) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    block cidr;
    above_lo bigint;
    above_hi bigint;
    below_lo bigint;
BEGIN
    SELECT s.cidr INTO block FROM allocator.subnets s WHERE s.id = freed_subnet;
    IF NOT FOUND OR a NOT BETWEEN allocator.usable_first(block) AND allocator.usable_last(block) THEN
        RETURN;  -- never taken from the ranges
    END IF;
    SELECT f.lo, f.hi INTO above_lo, above_hi FROM allocator.free_ranges f
    WHERE f.subnet_id = freed_subnet AND f.hi >= a
    ORDER BY f.hi LIMIT 1
    FOR UPDATE;
    IF FOUND AND above_lo <= a THEN
        RAISE EXCEPTION 'address % of subnet % is free already', '0.0.0.0'::inet + a, freed_subnet;
    END IF;
    IF above_lo <> a + 1 THEN
        above_hi := NULL;  -- a range above, but not adjacent
    END IF;
    SELECT f.lo INTO below_lo FROM allocator.free_ranges f
    WHERE f.subnet_id = freed_subnet AND f.hi = a - 1
    FOR UPDATE;
    IF above_hi IS NOT NULL THEN  -- widen the range above (its key, hi, stays), absorbing the one below
        IF below_lo IS NOT NULL THEN
            DELETE FROM allocator.free_ranges WHERE subnet_id = freed_subnet AND hi = a - 1;
        END IF;
        UPDATE allocator.free_ranges SET lo = coalesce(below_lo, a) WHERE subnet_id = freed_subnet AND hi = above_hi;
    ELSIF below_lo IS NOT NULL THEN
        UPDATE allocator.free_ranges SET hi = a WHERE subnet_id = freed_subnet AND hi = a - 1;
    ELSE
        INSERT INTO allocator.free_ranges (subnet_id, lo, hi) VALUES (freed_subnet, a, a);
    END IF;
END
$$;

-- Take addresses out of the free ranges: (subnet_ids[i], addresses[i]) pairs, as integers. Raises
-- unique_violation (constraint free_ranges_address_free: ADDRESS_IN_USE in the API) when one is not free.
-- One address goes the short way (take_address); many, as from a bulk INSERT, in one set-based pass.
CREATE FUNCTION take_addresses(subnet_ids uuid[], addresses bigint[]) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    taken_subnet uuid;
    taken_address bigint;
BEGIN
    IF cardinality(addresses) = 1 THEN
        PERFORM allocator.take_address(subnet_ids[1], addresses[1]);
        RETURN;
    END IF;
    -- Lock the range holding each address; an address that none holds is in use, or not usable.
    SELECT p.subnet_id, p.a INTO taken_subnet, taken_address
    FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
    LEFT JOIN LATERAL (
        SELECT f.lo FROM allocator.free_ranges f
        WHERE f.subnet_id = p.subnet_id AND f.hi >= p.a
        ORDER BY f.hi LIMIT 1
        FOR UPDATE
    ) r ON true
    WHERE r.lo IS NULL OR r.lo > p.a
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            CONSTRAINT = 'free_ranges_address_free',
            MESSAGE = format('address %s of subnet %s is not free', '0.0.0.0'::inet + taken_address, taken_subnet);
    END IF;
    -- Each range that holds k of the addresses p1 < … < pk becomes [lo, p1-1], [p1+1, p2-1], …, [pk+1, hi]
    -- (the empty ones dropped): the last piece keeps the row (its key, hi, is unchanged), the others are new.
    WITH points AS (
        SELECT DISTINCT p.subnet_id, p.a FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
    ),
    hits AS (
        SELECT p.subnet_id, p.a, r.lo, r.hi
        FROM points p
        JOIN LATERAL (
            SELECT f.lo, f.hi FROM allocator.free_ranges f
            WHERE f.subnet_id = p.subnet_id AND f.hi >= p.a
            ORDER BY f.hi LIMIT 1
        ) r ON true
    ),
    tails AS (
        SELECT subnet_id, hi, max(a) + 1 AS new_lo FROM hits GROUP BY subnet_id, hi
    ),
    shrunk AS (
        UPDATE allocator.free_ranges f SET lo = t.new_lo
        FROM tails t
        WHERE f.subnet_id = t.subnet_id AND f.hi = t.hi AND t.new_lo <= t.hi
    ),
    emptied AS (
        DELETE FROM allocator.free_ranges f
        USING tails t
        WHERE f.subnet_id = t.subnet_id AND f.hi = t.hi AND t.new_lo > t.hi
    ),
    pieces AS (
        SELECT subnet_id, coalesce(lag(a) OVER w + 1, lo) AS lo, a - 1 AS hi
        FROM hits
        WINDOW w AS (PARTITION BY subnet_id, hi ORDER BY a)
    )
    INSERT INTO allocator.free_ranges (subnet_id, lo, hi)
    SELECT subnet_id, lo, hi FROM pieces WHERE lo <= hi;
END
$$;

-- Give addresses back to the free ranges, merged with the free neighbours on either side. Addresses outside
-- their subnet's usable range are ignored (none can be taken); one that is already free raises. One address
-- goes the short way (give_back_address); many in one set-based pass.
CREATE FUNCTION give_back_addresses(subnet_ids uuid[], addresses bigint[]) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    freed_subnet uuid;
    freed_address bigint;
BEGIN
    IF cardinality(addresses) = 1 THEN
        PERFORM allocator.give_back_address(subnet_ids[1], addresses[1]);
        RETURN;
    END IF;
    SELECT p.subnet_id, p.a INTO freed_subnet, freed_address
    FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
    JOIN LATERAL (
        SELECT f.lo FROM allocator.free_ranges f
        WHERE f.subnet_id = p.subnet_id AND f.hi >= p.a
        ORDER BY f.hi LIMIT 1
    ) r ON r.lo <= p.a
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'address % of subnet % is free already', '0.0.0.0'::inet + freed_address, freed_subnet;
    END IF;
    -- Lock the neighbours: the range ending just below each address, and the next range above it.
    PERFORM 1
    FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
    JOIN allocator.free_ranges f ON f.subnet_id = p.subnet_id AND f.hi = p.a - 1
    FOR UPDATE OF f;
    PERFORM 1
    FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
    JOIN LATERAL (
        SELECT f.hi FROM allocator.free_ranges f
        WHERE f.subnet_id = p.subnet_id AND f.hi > p.a
        ORDER BY f.hi LIMIT 1
        FOR UPDATE
    ) r ON true;
    -- The freed addresses and their neighbouring ranges, sorted, fall into runs of adjacent segments
    -- (islands); each island becomes one range. When an island ends with a stored range, that row is kept
    -- (same key) and widened downwards; the other stored ranges of the island go.
    WITH points AS (
        SELECT DISTINCT p.subnet_id, p.a
        FROM unnest(subnet_ids, addresses) AS p (subnet_id, a)
        JOIN allocator.subnets s ON s.id = p.subnet_id
        WHERE p.a BETWEEN allocator.usable_first(s.cidr) AND allocator.usable_last(s.cidr)
    ),
    neighbours AS (
        SELECT f.subnet_id, f.lo, f.hi
        FROM points p JOIN allocator.free_ranges f ON f.subnet_id = p.subnet_id AND f.hi = p.a - 1
        UNION
        SELECT p.subnet_id, r.lo, r.hi
        FROM points p
        JOIN LATERAL (
            SELECT f.lo, f.hi FROM allocator.free_ranges f
            WHERE f.subnet_id = p.subnet_id AND f.hi > p.a
            ORDER BY f.hi LIMIT 1
        ) r ON r.lo = p.a + 1
    ),
    segments AS (
        SELECT subnet_id, a AS lo, a AS hi, false AS stored FROM points
        UNION ALL
        SELECT subnet_id, lo, hi, true FROM neighbours
    ),
    starts AS (
        SELECT *, CASE WHEN lag(hi) OVER w IS NULL OR lo > lag(hi) OVER w + 1 THEN 1 ELSE 0 END AS starts_island
        FROM segments
        WINDOW w AS (PARTITION BY subnet_id ORDER BY lo)
    ),
    numbered AS (
        SELECT *, sum(starts_island) OVER (PARTITION BY subnet_id ORDER BY lo) AS island FROM starts
    ),
    islands AS (
        SELECT subnet_id, min(lo) AS lo, max(hi) AS hi, (array_agg(stored ORDER BY hi DESC))[1] AS ends_stored
        FROM numbered
        GROUP BY subnet_id, island
    ),
    widened AS (
        UPDATE allocator.free_ranges f SET lo = i.lo
        FROM islands i
        WHERE i.ends_stored AND f.subnet_id = i.subnet_id AND f.hi = i.hi
    ),
    merged_away AS (
        DELETE FROM allocator.free_ranges f
        USING neighbours n
        WHERE f.subnet_id = n.subnet_id AND f.hi = n.hi
          AND NOT EXISTS (SELECT 1 FROM islands i WHERE i.ends_stored AND i.subnet_id = n.subnet_id AND i.hi = n.hi)
    )
    INSERT INTO allocator.free_ranges (subnet_id, lo, hi)
    SELECT subnet_id, lo, hi FROM islands WHERE NOT ends_stored;
END
$$;

-- ---- 2. HAVIPs per subnet ----------------------------------------------------------------------------------
--
-- The quota check sums its VPC's rows (one per subnet) instead of counting the VPC's HAVIPs. A row is touched
-- only by changes of its own subnet, which the subnet's advisory lock already serialises, so counting adds no
-- lock that allocations in different subnets of one VPC would queue on: they still meet only at the VPC's
-- advisory lock, which the allocator takes last, just before it reads the sum.

CREATE TABLE subnet_havip_counts (
    subnet_id uuid PRIMARY KEY REFERENCES subnets (id) ON DELETE CASCADE,  -- derived: goes with its (empty) subnet
    vpc_id uuid NOT NULL,
    havips integer NOT NULL CHECK (havips >= 0)
);
CREATE INDEX subnet_havip_counts_vpc ON subnet_havip_counts (vpc_id);

-- One entry of subnet_ids per HAVIP added or removed (delta +1 or -1 each). PL/pgSQL rather than a SQL
-- function: it keeps its plans (a SQL function plans its statement again at every call).
CREATE FUNCTION count_havips(subnet_ids uuid[], delta integer) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(subnet_ids) = 1 THEN
        UPDATE allocator.subnet_havip_counts SET havips = havips + delta WHERE subnet_id = subnet_ids[1];
        RETURN;
    END IF;
    UPDATE allocator.subnet_havip_counts c SET havips = c.havips + r.n * delta
    FROM (SELECT subnet_id, count(*) AS n FROM unnest(subnet_ids) AS v (subnet_id) GROUP BY subnet_id) r
    WHERE c.subnet_id = r.subnet_id;
END
$$;

CREATE FUNCTION rebuild_havip_counts() RETURNS void
    LANGUAGE sql AS $$
    DELETE FROM allocator.subnet_havip_counts;
    INSERT INTO allocator.subnet_havip_counts (subnet_id, vpc_id, havips)
    SELECT s.id, s.vpc_id, (SELECT count(*) FROM allocator.havips h WHERE h.subnet_id = s.id)
    FROM allocator.subnets s;
$$;

-- ---- rebuilding ----------------------------------------------------------------------------------------------

-- Recompute every subnet's free ranges from the rows (the back-fill below, and after a TRUNCATE).
CREATE FUNCTION rebuild_free_ranges() RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM allocator.free_ranges;
    WITH bounds AS (
        SELECT id, allocator.usable_first(cidr) AS first, allocator.usable_last(cidr) AS last
        FROM allocator.subnets
    ),
    used AS (
        SELECT subnet_id, address - '0.0.0.0'::inet AS a FROM allocator.havips
        UNION
        SELECT subnet_id, private_ip - '0.0.0.0'::inet FROM allocator.instances
    ),
    fences AS (  -- the used addresses, between two sentinels just outside the usable range
        SELECT u.subnet_id, u.a FROM used u JOIN bounds b ON b.id = u.subnet_id WHERE u.a BETWEEN b.first AND b.last
        UNION ALL
        SELECT id, first - 1 FROM bounds
        UNION ALL
        SELECT id, last + 1 FROM bounds
    ),
    gaps AS (
        SELECT subnet_id, lag(a) OVER (PARTITION BY subnet_id ORDER BY a) + 1 AS lo, a - 1 AS hi FROM fences
    )
    INSERT INTO allocator.free_ranges (subnet_id, lo, hi)
    SELECT subnet_id, lo, hi FROM gaps WHERE lo <= hi;
END
$$;

-- ---- triggers ---------------------------------------------------------------------------------------------

CREATE FUNCTION subnet_created() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO allocator.free_ranges (subnet_id, lo, hi)
    VALUES (NEW.id, allocator.usable_first(NEW.cidr), allocator.usable_last(NEW.cidr));
    INSERT INTO allocator.subnet_havip_counts (subnet_id, vpc_id, havips) VALUES (NEW.id, NEW.vpc_id, 0);
    RETURN NULL;
END
$$;

-- Statement-level, with transition tables: one set-based pass per statement, so a bulk INSERT of 50,000 HAVIPs
-- costs one pass, not 50,000 (and a one-row INSERT the same as before: one probe, one update).
CREATE FUNCTION havips_taken() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM allocator.take_addresses(array_agg(subnet_id), array_agg(address - '0.0.0.0'::inet)),
            allocator.count_havips(array_agg(subnet_id), 1)
    FROM added HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION havips_released() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM allocator.give_back_addresses(array_agg(subnet_id), array_agg(address - '0.0.0.0'::inet)),
            allocator.count_havips(array_agg(subnet_id), -1)
    FROM removed HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION instances_taken() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM allocator.take_addresses(array_agg(subnet_id), array_agg(private_ip - '0.0.0.0'::inet)) FROM added;
    RETURN NULL;
END
$$;

CREATE FUNCTION instances_released() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM allocator.give_back_addresses(array_agg(subnet_id), array_agg(private_ip - '0.0.0.0'::inet))
    FROM removed;
    RETURN NULL;
END
$$;

CREATE FUNCTION address_is_fixed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        MESSAGE = format('the address or subnet of %s %s cannot change; release it and allocate again',
                         TG_TABLE_NAME, OLD.id);
END
$$;

CREATE FUNCTION free_ranges_rebuilt() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM allocator.rebuild_free_ranges(), allocator.rebuild_havip_counts();
    RETURN NULL;
END
$$;

CREATE TRIGGER subnet_created AFTER INSERT ON subnets
    FOR EACH ROW EXECUTE FUNCTION subnet_created();

CREATE TRIGGER havips_taken AFTER INSERT ON havips
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION havips_taken();
CREATE TRIGGER havips_released AFTER DELETE ON havips
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION havips_released();
CREATE TRIGGER havips_address_is_fixed BEFORE UPDATE OF address, subnet_id ON havips
    FOR EACH ROW WHEN (OLD.address IS DISTINCT FROM NEW.address OR OLD.subnet_id IS DISTINCT FROM NEW.subnet_id)
    EXECUTE FUNCTION address_is_fixed();
CREATE TRIGGER havips_truncated AFTER TRUNCATE ON havips
    FOR EACH STATEMENT EXECUTE FUNCTION free_ranges_rebuilt();

CREATE TRIGGER instances_taken AFTER INSERT ON instances
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION instances_taken();
CREATE TRIGGER instances_released AFTER DELETE ON instances
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION instances_released();
CREATE TRIGGER instances_address_is_fixed BEFORE UPDATE OF private_ip, subnet_id ON instances
    FOR EACH ROW WHEN (OLD.private_ip IS DISTINCT FROM NEW.private_ip OR OLD.subnet_id IS DISTINCT FROM NEW.subnet_id)
    EXECUTE FUNCTION address_is_fixed();
CREATE TRIGGER instances_truncated AFTER TRUNCATE ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION free_ranges_rebuilt();

SELECT rebuild_free_ranges(), rebuild_havip_counts();
