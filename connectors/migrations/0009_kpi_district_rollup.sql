-- 0009: per-district rollups of kpi_15m for Grafana's all-node panels (issue 9,
-- bench/grafana_queries.py, bench/README.md "Grafana panel queries").
--
-- The boards' district panels (readings per interval, completeness, flow by district, inflow
-- volume, totals, hour of week, daily profile) aggregated every selected node's kpi_15m rows:
-- 336 k rows a week, 17.5 M a year at 500 nodes, 0.15-3 s at 7 days and up to 19 s at a year.
-- Now they read water.kpi_by_district(nodes, from, to, step), which returns one row per
-- district and 15-minute window, hour or UTC day:
--   - for a district all of whose nodes are selected (every district when the node variable is
--     All, or the districts picked with the district variable): the rollups below, at the
--     coarsest grain that divides the panel's time bucket (a day or an hour when `step` is a
--     whole number of them, else 15 minutes) for the days/hours entirely inside the range, and
--     15-minute rows at the range's ends;
--   - for the other selected nodes: their kpi_15m rows, aggregated the same way at read time.
-- The sums are those the panels computed over the node rows (sum of n, of completeness and its
-- count, of the flow of nodes that are not inflow meters and its count, of the inflow meters'
-- volume, and the 15-minute windows with such a flow), so the panels show the same values; float
-- sums are added in another order (equal to about 1e-15 relative). A district is
-- coalesce(nodes.district, 'none') and a node's role is read from water.nodes, as the panels do;
-- kpi_15m rows of nodes missing from water.nodes are in no rollup (the panels' join drops them).
--
-- Maintenance: statement-level triggers on kpi_15m (insert, update, delete; transition tables)
-- and on nodes (a node added, removed, or moved to another district or role) recompute the
-- rollup rows of the (district, 15-minute window) pairs the statement touched, from kpi_15m,
-- in the writer's transaction, then the hours and days over them. So every writer (replay, the
-- live Kafka run, `waterflow backfill`, a re-written or late window) keeps them exact without
-- knowing about them, and a reader never sees a rollup that disagrees with kpi_15m's committed
-- rows. Concurrent writers of the same district and UTC day (two Kafka workers) take a
-- transaction advisory lock per (district, day) first, in a fixed order, and recompute after
-- it (READ COMMITTED: the recompute sees what the other writer committed); they wait for each
-- other's commit there. TRUNCATE of kpi_15m empties the rollups. Dropping a kpi_15m partition
-- (retention) fires no trigger: water.trim_kpi_rollup(), which retention calls, deletes the
-- rollup rows older than the oldest kpi_15m partition.
--
-- Local-time panels (hour of week, daily profile) read hours: exact for time zones whose UTC
-- offset is a whole number of hours (the boards' Europe/Rome).

CREATE TABLE water.kpi_district_15m (
    district         text NOT NULL,
    window_start     timestamptz NOT NULL,
    n                bigint,
    completeness_sum double precision,
    completeness_n   bigint NOT NULL,
    flow_sum         double precision,  -- flow_rate_avg of nodes that are not inflow meters
    flow_n           bigint NOT NULL,
    inflow_volume    double precision,  -- volume_m3 of the inflow meters
    PRIMARY KEY (district, window_start)
);

-- flow_windows: the 15-minute windows of the hour (day) with flow_n > 0.
CREATE TABLE water.kpi_district_hour (
    district         text NOT NULL,
    hour             timestamptz NOT NULL,
    n                bigint,
    completeness_sum double precision,
    completeness_n   bigint NOT NULL,
    flow_sum         double precision,
    flow_n           bigint NOT NULL,
    flow_windows     bigint NOT NULL,
    inflow_volume    double precision,
    PRIMARY KEY (district, hour)
);

CREATE TABLE water.kpi_district_day (
    district         text NOT NULL,
    day              timestamptz NOT NULL,  -- 00:00 UTC
    n                bigint,
    completeness_sum double precision,
    completeness_n   bigint NOT NULL,
    flow_sum         double precision,
    flow_n           bigint NOT NULL,
    flow_windows     bigint NOT NULL,
    inflow_volume    double precision,
    PRIMARY KEY (district, day)
);

-- Recompute the rollup rows of the (district, window_start) pairs given, from kpi_15m and
-- nodes, then their hours and days. Callers: the triggers below.
-- Planned for the keys of each call (force_custom_plan): one window is read by key probes, a
-- replay's day of windows by a range scan.
CREATE FUNCTION water.kpi_rollup_recompute(districts text[], windows timestamptz[])
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    first_w timestamptz;
    last_w timestamptz;
BEGIN
    IF coalesce(cardinality(districts), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT min(w), max(w) INTO first_w, last_w FROM unnest(windows) AS w;
    -- One lock per (district, UTC day), in the order of the lock keys: concurrent writers wait
    -- for each other instead of each recomputing without the other's rows; no deadlock.
    PERFORM pg_advisory_xact_lock(x.k1, x.k2)
    FROM (SELECT DISTINCT hashtext('water.kpi_rollup') AS k1,
                 hashtext(k.district || '/'
                          || extract(epoch FROM date_trunc('day', k.w, 'UTC'))::bigint) AS k2
          FROM unnest(districts, windows) AS k(district, w)) AS x
    ORDER BY x.k1, x.k2;

    DELETE FROM water.kpi_district_15m AS r
    USING (SELECT DISTINCT k.district, k.w AS window_start
          FROM unnest(districts, windows) AS k(district, w)) AS k
    WHERE r.district = k.district AND r.window_start = k.window_start;
    INSERT INTO water.kpi_district_15m
    SELECT k.district, k.window_start, sum(q.n), sum(q.completeness), count(q.completeness),
           sum(q.flow_rate_avg) FILTER (WHERE n.role IS DISTINCT FROM 'inflow'),
           count(q.flow_rate_avg) FILTER (WHERE n.role IS DISTINCT FROM 'inflow'),
           sum(q.volume_m3) FILTER (WHERE n.role = 'inflow')
    FROM (SELECT DISTINCT k.district, k.w AS window_start
          FROM unnest(districts, windows) AS k(district, w)) AS k
    JOIN water.nodes AS n ON coalesce(n.district, 'none') = k.district
    JOIN water.kpi_15m AS q ON q.node_id = n.node_id AND q.window_start = k.window_start
    WHERE q.window_start >= first_w AND q.window_start <= last_w
    GROUP BY k.district, k.window_start;

    DELETE FROM water.kpi_district_hour AS r
    USING (SELECT DISTINCT district, date_trunc('hour', window_start, 'UTC') AS hour
           FROM unnest(districts, windows) AS k(district, window_start)) AS h
    WHERE r.district = h.district AND r.hour = h.hour;
    -- LATERAL: each hour (day) reads its own rows by key range, whatever the statistics say.
    INSERT INTO water.kpi_district_hour
    SELECT h.district, h.hour, x.n, x.completeness_sum, x.completeness_n, x.flow_sum, x.flow_n,
           x.flow_windows, x.inflow_volume
    FROM (SELECT DISTINCT district, date_trunc('hour', window_start, 'UTC') AS hour
          FROM unnest(districts, windows) AS k(district, window_start)) AS h
    CROSS JOIN LATERAL (
        SELECT count(*) AS windows, sum(r.n) AS n, sum(r.completeness_sum) AS completeness_sum,
               sum(r.completeness_n) AS completeness_n, sum(r.flow_sum) AS flow_sum,
               sum(r.flow_n) AS flow_n, count(*) FILTER (WHERE r.flow_n > 0) AS flow_windows,
               sum(r.inflow_volume) AS inflow_volume
        FROM water.kpi_district_15m AS r
        WHERE r.district = h.district
          AND r.window_start >= h.hour AND r.window_start < h.hour + interval '1 hour') AS x
    WHERE x.windows > 0;

    DELETE FROM water.kpi_district_day AS r
    USING (SELECT DISTINCT district, date_trunc('day', window_start, 'UTC') AS day
           FROM unnest(districts, windows) AS k(district, window_start)) AS d
    WHERE r.district = d.district AND r.day = d.day;
    INSERT INTO water.kpi_district_day
    SELECT d.district, d.day, x.n, x.completeness_sum, x.completeness_n, x.flow_sum, x.flow_n,
           x.flow_windows, x.inflow_volume
    FROM (SELECT DISTINCT district, date_trunc('day', window_start, 'UTC') AS day
          FROM unnest(districts, windows) AS k(district, window_start)) AS d
    CROSS JOIN LATERAL (
        SELECT count(*) AS hours, sum(r.n) AS n, sum(r.completeness_sum) AS completeness_sum,
               sum(r.completeness_n) AS completeness_n, sum(r.flow_sum) AS flow_sum,
               sum(r.flow_n) AS flow_n, sum(r.flow_windows) AS flow_windows,
               sum(r.inflow_volume) AS inflow_volume
        FROM water.kpi_district_hour AS r
        WHERE r.district = d.district
          AND r.hour >= d.day AND r.hour < d.day + interval '1 day') AS x
    WHERE x.hours > 0;
END
$$;
REVOKE ALL ON FUNCTION water.kpi_rollup_recompute(text[], timestamptz[]) FROM PUBLIC;

-- kpi_15m: the (district, window) pairs of the rows a statement inserted, updated (before and
-- after) or deleted.
CREATE FUNCTION water.kpi_rollup_on_kpi()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ds text[];
    ws timestamptz[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(x.d), array_agg(x.w) INTO ds, ws
        FROM (SELECT DISTINCT coalesce(n.district, 'none') AS d, r.window_start AS w
              FROM new_rows AS r JOIN water.nodes AS n ON n.node_id = r.node_id) AS x;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(x.d), array_agg(x.w) INTO ds, ws
        FROM (SELECT DISTINCT coalesce(n.district, 'none') AS d, r.window_start AS w
              FROM (SELECT node_id, window_start FROM new_rows
                    UNION SELECT node_id, window_start FROM old_rows) AS r
              JOIN water.nodes AS n ON n.node_id = r.node_id) AS x;
    ELSE
        SELECT array_agg(x.d), array_agg(x.w) INTO ds, ws
        FROM (SELECT DISTINCT coalesce(n.district, 'none') AS d, r.window_start AS w
              FROM old_rows AS r JOIN water.nodes AS n ON n.node_id = r.node_id) AS x;
    END IF;
    PERFORM water.kpi_rollup_recompute(ds, ws);
    RETURN NULL;
END
$$;

CREATE TRIGGER kpi_rollup_insert AFTER INSERT ON water.kpi_15m
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_kpi();
CREATE TRIGGER kpi_rollup_update AFTER UPDATE ON water.kpi_15m
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_kpi();
CREATE TRIGGER kpi_rollup_delete AFTER DELETE ON water.kpi_15m
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_kpi();

CREATE FUNCTION water.kpi_rollup_on_kpi_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    TRUNCATE water.kpi_district_15m, water.kpi_district_hour, water.kpi_district_day;
    RETURN NULL;
END
$$;
CREATE TRIGGER kpi_rollup_truncate AFTER TRUNCATE ON water.kpi_15m
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_kpi_truncate();

-- nodes: a node added, removed, or whose district or role changed moves its kpi_15m windows
-- between districts (or in or out of the flow and inflow sums): recompute its windows in the
-- district it left and in the one it joined. Upserts that change nothing else cost nothing.
CREATE FUNCTION water.kpi_rollup_on_nodes()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ds text[];
    ws timestamptz[];
BEGIN
    WITH moved AS (
        SELECT o.node_id, coalesce(o.district, 'none') AS district
        FROM old_rows AS o
        LEFT JOIN new_rows AS n ON n.node_id = o.node_id
        WHERE n.node_id IS NULL OR o.district IS DISTINCT FROM n.district
           OR o.role IS DISTINCT FROM n.role
        UNION
        SELECT n.node_id, coalesce(n.district, 'none')
        FROM new_rows AS n
        LEFT JOIN old_rows AS o ON o.node_id = n.node_id
        WHERE o.node_id IS NULL OR o.district IS DISTINCT FROM n.district
           OR o.role IS DISTINCT FROM n.role
    )
    SELECT array_agg(x.district), array_agg(x.window_start) INTO ds, ws
    FROM (SELECT DISTINCT m.district, q.window_start
          FROM moved AS m JOIN water.kpi_15m AS q ON q.node_id = m.node_id) AS x;
    PERFORM water.kpi_rollup_recompute(ds, ws);
    RETURN NULL;
END
$$;

-- One function for the three events: a missing transition table is an empty one.
CREATE FUNCTION water.kpi_rollup_on_nodes_insert()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ds text[];
    ws timestamptz[];
BEGIN
    SELECT array_agg(x.district), array_agg(x.window_start) INTO ds, ws
    FROM (SELECT DISTINCT coalesce(n.district, 'none') AS district, q.window_start
          FROM new_rows AS n JOIN water.kpi_15m AS q ON q.node_id = n.node_id) AS x;
    PERFORM water.kpi_rollup_recompute(ds, ws);
    RETURN NULL;
END
$$;

CREATE FUNCTION water.kpi_rollup_on_nodes_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ds text[];
    ws timestamptz[];
BEGIN
    SELECT array_agg(x.district), array_agg(x.window_start) INTO ds, ws
    FROM (SELECT DISTINCT coalesce(o.district, 'none') AS district, q.window_start
          FROM old_rows AS o JOIN water.kpi_15m AS q ON q.node_id = o.node_id) AS x;
    PERFORM water.kpi_rollup_recompute(ds, ws);
    RETURN NULL;
END
$$;

CREATE TRIGGER kpi_rollup_nodes_insert AFTER INSERT ON water.nodes
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_nodes_insert();
CREATE TRIGGER kpi_rollup_nodes_update AFTER UPDATE ON water.nodes
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_nodes();
CREATE TRIGGER kpi_rollup_nodes_delete AFTER DELETE ON water.nodes
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_nodes_delete();

CREATE FUNCTION water.kpi_rollup_on_nodes_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    TRUNCATE water.kpi_district_15m, water.kpi_district_hour, water.kpi_district_day;
    RETURN NULL;
END
$$;
CREATE TRIGGER kpi_rollup_nodes_truncate AFTER TRUNCATE ON water.nodes
    FOR EACH STATEMENT EXECUTE FUNCTION water.kpi_rollup_on_nodes_truncate();

-- Retention drops kpi_15m partitions (DETACH, DROP: no trigger fires): the rollup rows before
-- the oldest partition left go too. Returns the rows deleted.
CREATE FUNCTION water.trim_kpi_rollup()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    oldest timestamptz;
    a bigint;
    b bigint;
    c bigint;
BEGIN
    SELECT min((regexp_match(pg_get_expr(p.relpartbound, p.oid),
                             'FROM \(''([^'']*)''\)'))[1]::timestamptz)
    INTO oldest
    FROM pg_inherits AS i JOIN pg_class AS p ON p.oid = i.inhrelid
    WHERE i.inhparent = 'water.kpi_15m'::regclass;
    oldest := coalesce(oldest, 'infinity');
    DELETE FROM water.kpi_district_15m WHERE window_start < oldest;
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM water.kpi_district_hour WHERE hour < date_trunc('hour', oldest, 'UTC');
    GET DIAGNOSTICS b = ROW_COUNT;
    DELETE FROM water.kpi_district_day WHERE day < date_trunc('day', oldest, 'UTC');
    GET DIAGNOSTICS c = ROW_COUNT;
    RETURN a + b + c;
END
$$;
REVOKE ALL ON FUNCTION water.trim_kpi_rollup() FROM PUBLIC;

-- What the panels read: per district and 15-minute window, hour or UTC day, the sums over the
-- kpi_15m rows of `nodes` with window_start BETWEEN lo AND hi (the panels' $__timeFilter). `t`
-- is the row's window, hour or day start; `step` is the panel's time bucket ($__interval): days
-- and hours are only returned when it is a whole number of them, so that a bucket never splits
-- a row; nodes of districts not wholly selected come summed per bucket of `step` (epoch
-- aligned, as Grafana's $__timeGroup). `roles` = 'inflow' or 'not inflow' says that the panel
-- reads only the columns of those nodes (inflow_volume, or the flow ones), so that the other
-- selected nodes' rows are not read at all; those nodes' flow_windows are counted only with
-- 'not inflow' (NULL otherwise), their inflow_volume only without it. A SQL function the
-- planner inlines into the panel.
CREATE FUNCTION water.kpi_by_district(nodes text[], lo timestamptz, hi timestamptz, step interval,
                                      roles text DEFAULT NULL)
RETURNS TABLE (district text, t timestamptz, n bigint, completeness_sum double precision,
               completeness_n bigint, flow_sum double precision, flow_n bigint,
               flow_windows bigint, inflow_volume double precision)
LANGUAGE sql STABLE
AS $$
    WITH sel AS (
        SELECT s.node_id, coalesce(s.district, 'none') AS district, s.role
        FROM water.nodes AS s WHERE s.node_id = ANY (nodes)
    ), whole AS (
        SELECT array_agg(x.district) AS ds FROM (
            SELECT w.district FROM sel AS w GROUP BY w.district
            HAVING count(*) = (SELECT count(*) FROM water.nodes AS a
                               WHERE coalesce(a.district, 'none') = w.district)) AS x
    ), b AS (
        -- [h_lo, h_hi): the whole hours inside [lo, hi] when step is whole hours;
        -- [d_lo, d_hi): the whole UTC days inside it when step is whole days, else empty.
        SELECT CASE WHEN y.hours AND y.h_lo < y.h_hi THEN y.h_lo END AS h_lo,
               CASE WHEN y.hours AND y.h_lo < y.h_hi THEN y.h_hi END AS h_hi,
               CASE WHEN y.days AND y.d_lo < y.d_hi THEN y.d_lo END AS d_lo,
               CASE WHEN y.days AND y.d_lo < y.d_hi THEN y.d_hi END AS d_hi
        FROM (SELECT extract(epoch FROM step) > 0 AND extract(epoch FROM step) % 3600 = 0 AS hours,
                     extract(epoch FROM step) > 0 AND extract(epoch FROM step) % 86400 = 0 AS days,
                     date_trunc('hour', lo - interval '1 microsecond', 'UTC') + interval '1 hour'
                         AS h_lo,
                     date_trunc('hour', hi, 'UTC') AS h_hi,
                     date_trunc('day', lo - interval '1 microsecond', 'UTC') + interval '1 day'
                         AS d_lo,
                     date_trunc('day', hi, 'UTC') AS d_hi) AS y
    )
    -- whole days
    SELECT r.district, r.day, r.n, r.completeness_sum, r.completeness_n, r.flow_sum, r.flow_n,
           r.flow_windows, r.inflow_volume
    FROM water.kpi_district_day AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.day >= (SELECT d_lo FROM b) AND r.day < (SELECT d_hi FROM b)
    UNION ALL
    -- whole hours outside those days
    SELECT r.district, r.hour, r.n, r.completeness_sum, r.completeness_n, r.flow_sum, r.flow_n,
           r.flow_windows, r.inflow_volume
    FROM water.kpi_district_hour AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.hour >= (SELECT h_lo FROM b)
      AND r.hour < (SELECT coalesce(d_lo, h_hi) FROM b)
    UNION ALL
    SELECT r.district, r.hour, r.n, r.completeness_sum, r.completeness_n, r.flow_sum, r.flow_n,
           r.flow_windows, r.inflow_volume
    FROM water.kpi_district_hour AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.hour >= (SELECT d_hi FROM b) AND r.hour < (SELECT h_hi FROM b)
    UNION ALL
    -- 15-minute windows outside those hours (all of [lo, hi] when no hour is used)
    SELECT r.district, r.window_start, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
           r.flow_n, (r.flow_n > 0)::int::bigint, r.inflow_volume
    FROM water.kpi_district_15m AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.window_start >= lo AND r.window_start <= hi
      AND r.window_start < (SELECT coalesce(h_lo, 'infinity') FROM b)
    UNION ALL
    SELECT r.district, r.window_start, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
           r.flow_n, (r.flow_n > 0)::int::bigint, r.inflow_volume
    FROM water.kpi_district_15m AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.window_start >= (SELECT h_hi FROM b) AND r.window_start <= hi
    UNION ALL
    -- the selected nodes of the other districts, from their own rows, per time bucket (t is
    -- the bucket's start); flow_windows (the bucket's windows with a flow, as the panels
    -- counted them) needs a count of distinct windows, a sort: only for roles = 'not inflow'
    SELECT s.district,
           CASE WHEN extract(epoch FROM step) > 0
                THEN date_bin(step, q.window_start, timestamptz '1970-01-01 00:00:00+00')
                ELSE q.window_start END,
           sum(q.n)::bigint, sum(q.completeness), count(q.completeness),
           sum(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow'),
           count(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow'),
           count(DISTINCT q.window_start) FILTER (WHERE q.flow_rate_avg IS NOT NULL
                                                  AND s.role IS DISTINCT FROM 'inflow'),
           NULL::double precision
    FROM sel AS s
    JOIN water.kpi_15m AS q ON q.node_id = s.node_id
    WHERE roles = 'not inflow' AND s.role IS DISTINCT FROM 'inflow'
      AND s.district <> ALL (coalesce((SELECT ds FROM whole), '{}'))
      AND q.window_start >= lo AND q.window_start <= hi
    GROUP BY 1, 2
    UNION ALL
    SELECT s.district,
           CASE WHEN extract(epoch FROM step) > 0
                THEN date_bin(step, q.window_start, timestamptz '1970-01-01 00:00:00+00')
                ELSE q.window_start END,
           sum(q.n)::bigint, sum(q.completeness), count(q.completeness),
           sum(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow'),
           count(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow'),
           NULL::bigint,
           sum(q.volume_m3) FILTER (WHERE s.role = 'inflow')
    FROM sel AS s
    JOIN water.kpi_15m AS q ON q.node_id = s.node_id
    WHERE roles IS DISTINCT FROM 'not inflow'
      AND (roles IS NULL OR (roles = 'inflow') = coalesce(s.role = 'inflow', false))
      AND s.district <> ALL (coalesce((SELECT ds FROM whole), '{}'))
      AND q.window_start >= lo AND q.window_start <= hi
    GROUP BY 1, 2
$$;

-- The rollups of what kpi_15m holds now, in time order (as the writers add them later): a
-- panel's range is then a few contiguous pages of each table.
INSERT INTO water.kpi_district_15m
SELECT coalesce(n.district, 'none'), q.window_start, sum(q.n), sum(q.completeness),
       count(q.completeness),
       sum(q.flow_rate_avg) FILTER (WHERE n.role IS DISTINCT FROM 'inflow'),
       count(q.flow_rate_avg) FILTER (WHERE n.role IS DISTINCT FROM 'inflow'),
       sum(q.volume_m3) FILTER (WHERE n.role = 'inflow')
FROM water.kpi_15m AS q JOIN water.nodes AS n ON n.node_id = q.node_id
GROUP BY 1, 2 ORDER BY 2, 1;
INSERT INTO water.kpi_district_hour
SELECT district, date_trunc('hour', window_start, 'UTC'), sum(n), sum(completeness_sum),
       sum(completeness_n), sum(flow_sum), sum(flow_n), count(*) FILTER (WHERE flow_n > 0),
       sum(inflow_volume)
FROM water.kpi_district_15m GROUP BY 1, 2 ORDER BY 2, 1;
INSERT INTO water.kpi_district_day
SELECT district, date_trunc('day', hour, 'UTC'), sum(n), sum(completeness_sum),
       sum(completeness_n), sum(flow_sum), sum(flow_n), sum(flow_windows), sum(inflow_volume)
FROM water.kpi_district_hour GROUP BY 1, 2 ORDER BY 2, 1;
ANALYZE water.kpi_district_15m, water.kpi_district_hour, water.kpi_district_day;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        GRANT SELECT ON water.kpi_district_15m, water.kpi_district_hour, water.kpi_district_day
            TO water_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        -- The default privileges of 0002 gave the writer INSERT/UPDATE/DELETE: the rollups are
        -- the triggers' (SECURITY DEFINER) to write; the writer reads them.
        REVOKE INSERT, UPDATE, DELETE ON water.kpi_district_15m, water.kpi_district_hour,
            water.kpi_district_day FROM water_writer;
        GRANT EXECUTE ON FUNCTION water.trim_kpi_rollup() TO water_writer;
    END IF;
END
$$;
