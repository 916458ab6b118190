-- 0003: monthly range partitions (native declarative partitioning) for the time series tables:
--   water.readings   on ts            (retention: weeks, so monthly partitions drop cleanly)
--   water.kpi_15m    on window_start  (retention: 13 months)
--   water.kpi_daily  on day           (retention: 13 months; monthly rather than yearly so a
--                                      13-month retention keeps 13-14 months, not up to 24)
-- Existing rows are kept: the old table is renamed, the partitioned one created with the same
-- columns (LIKE), the months holding rows created, the rows moved, the old table dropped, all in
-- this migration's transaction.
--
-- water.quarantine stays unpartitioned, on purpose. Its key is the deterministic `id` (the same
-- rejected line of the same file always gets the same id), while received_at is the wall-clock
-- time of the run that saw it. A partitioned table's primary key must contain the partition
-- column, so the key would become (id, received_at), and replaying a file in a new run would
-- insert the same rejected line a second time instead of upserting it: the idempotency the
-- contract promises would be gone (received_at may also be NULL, which a partition key column
-- cannot be). Quarantine is small next to readings; `waterflow db retention` trims it with a
-- DELETE by received_at instead of dropping partitions.
--
-- There is no DEFAULT partition: a row landing there would block creating the partition of its
-- month later (PostgreSQL refuses a new partition whose range has rows in the default one).
-- Partitions are created before rows land by water.ensure_partitions(), which the writer calls
-- for the months a batch spans (cached per connection), and ahead of time by retention.

-- The monthly partitions of `tbl` covering [from_ts, to_ts] (both ends' months included), with
-- the names this schema uses: <table>_pYYYYMM. Months are UTC calendar months: bounds are
-- timestamptz at 00:00 UTC (or dates, for a date partition key). Pure: creates nothing.
CREATE FUNCTION water.month_partitions(tbl regclass, from_ts timestamptz, to_ts timestamptz)
RETURNS TABLE (partition_name text, lower_bound timestamptz, upper_bound timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT c.relname FROM pg_class AS c WHERE c.oid = tbl)
               || '_p' || to_char(m AT TIME ZONE 'UTC', 'YYYYMM'),
           m,
           (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC'
    FROM generate_series(
        date_trunc('month', from_ts, 'UTC'),
        date_trunc('month', to_ts, 'UTC'),
        interval '1 month'
    ) AS g(m)
$$;

-- Create the missing monthly partitions of `tbl` for [from_ts, to_ts]; return the names created.
-- SECURITY DEFINER (owned by the migrating user), so water_writer may call it without any DDL
-- right of its own: the only DDL it can cause is a partition of this exact shape.
-- A partition is created as a plain table and then attached: ATTACH PARTITION takes only a
-- SHARE UPDATE EXCLUSIVE lock on the parent, so Grafana's reads and other workers' writes go
-- on, where CREATE TABLE ... PARTITION OF would take an ACCESS EXCLUSIVE lock on the parent.
-- Matching indexes (the primary key, BRIN) are created on the new table by ATTACH itself.
CREATE FUNCTION water.ensure_partitions(tbl regclass, from_ts timestamptz, to_ts timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nsp text;
    key_type regtype;
    p record;
    lo text;
    hi text;
BEGIN
    SELECT n.nspname, a.atttypid::regtype INTO nsp, key_type
    FROM pg_partitioned_table AS pt
    JOIN pg_class AS c ON c.oid = pt.partrelid
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    JOIN pg_attribute AS a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
    WHERE pt.partrelid = tbl AND pt.partstrat = 'r' AND pt.partnatts = 1;
    IF nsp IS NULL THEN
        RAISE EXCEPTION 'ensure_partitions: % is not range-partitioned on one column', tbl;
    END IF;
    IF from_ts IS NULL OR to_ts IS NULL OR to_ts < from_ts THEN
        RAISE EXCEPTION 'ensure_partitions: bad range [%, %] for %', from_ts, to_ts, tbl;
    END IF;
    -- Two writers (Bytewax workers) reaching a new month at once: the second waits here and
    -- then sees the partition, instead of failing on a duplicate name.
    PERFORM pg_advisory_xact_lock(hashtext('water.ensure_partitions'), hashtext(tbl::text));
    FOR p IN SELECT * FROM water.month_partitions(tbl, from_ts, to_ts) LOOP
        CONTINUE WHEN to_regclass(format('%I.%I', nsp, p.partition_name)) IS NOT NULL;
        IF key_type = 'date'::regtype THEN
            lo := (p.lower_bound AT TIME ZONE 'UTC')::date::text;
            hi := (p.upper_bound AT TIME ZONE 'UTC')::date::text;
        ELSE
            -- ISO text with an explicit +00 offset, whatever the session's TimeZone/DateStyle.
            lo := to_char(p.lower_bound AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
            hi := to_char(p.upper_bound AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
        END IF;
        EXECUTE format(
            'CREATE TABLE %I.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)',
            nsp, p.partition_name, tbl);
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
            tbl, nsp, p.partition_name, lo, hi);
        RETURN NEXT p.partition_name;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION water.ensure_partitions(regclass, timestamptz, timestamptz) FROM PUBLIC;

-- Turn one plain table into a monthly partitioned one, keeping its rows.
CREATE FUNCTION pg_temp.partition_table(tbl text, col text, brin boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    old text := tbl || '_unpartitioned';
    m timestamptz;
    moved bigint;
BEGIN
    EXECUTE format('ALTER TABLE water.%I RENAME TO %I', tbl, old);
    -- Index names are unique per schema: free them for the new table's indexes.
    EXECUTE format('ALTER TABLE water.%I DROP CONSTRAINT %I', old, tbl || '_pkey');
    EXECUTE format('DROP INDEX IF EXISTS water.%I', tbl || '_' || col || '_brin');
    EXECUTE format(
        'CREATE TABLE water.%I (LIKE water.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
        ' INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (%I)', tbl, old, col);
    -- The natural key, which upserts (ON CONFLICT) match on; it contains the partition column,
    -- as PostgreSQL requires, and it is also the (node_id, time) index Grafana's panels use.
    EXECUTE format('ALTER TABLE water.%I ADD PRIMARY KEY (node_id, %I)', tbl, col);
    IF brin THEN
        -- Network-wide panels scan a time range inside the pruned partitions; BRIN stays tiny.
        EXECUTE format('CREATE INDEX %I ON water.%I USING brin (%I)', tbl || '_' || col || '_brin',
            tbl, col);
    END IF;
    -- Only the months that hold rows (not every month between the oldest and newest row).
    FOR m IN EXECUTE format('SELECT DISTINCT date_trunc(''month'', %I::timestamptz, ''UTC'')'
                            ' FROM water.%I', col, old) LOOP
        PERFORM water.ensure_partitions(format('water.%I', tbl)::regclass, m, m);
    END LOOP;
    EXECUTE format('INSERT INTO water.%I SELECT * FROM water.%I', tbl, old);
    GET DIAGNOSTICS moved = ROW_COUNT;
    RAISE NOTICE 'water.%: % row(s) moved into monthly partitions', tbl, moved;
    EXECUTE format('DROP TABLE water.%I', old);
END
$$;

SELECT pg_temp.partition_table('readings', 'ts', true);
SELECT pg_temp.partition_table('kpi_15m', 'window_start', true);
SELECT pg_temp.partition_table('kpi_daily', 'day', false);
DROP FUNCTION pg_temp.partition_table(text, text, boolean);

-- The new parents are new tables: grant again rather than rely on 0002's default privileges,
-- which only cover tables created by the role that ran 0002. Partitions created later by
-- ensure_partitions() need no grant for queries through the parent (privileges are checked on
-- the table named in the query only); they still get the default privileges of the function's
-- owner for direct reads.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        GRANT SELECT ON water.readings, water.kpi_15m, water.kpi_daily TO water_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON water.readings, water.kpi_15m, water.kpi_daily
            TO water_writer;
        GRANT EXECUTE ON FUNCTION water.ensure_partitions(regclass, timestamptz, timestamptz)
            TO water_writer;
    END IF;
END
$$;
