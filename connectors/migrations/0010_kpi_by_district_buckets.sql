-- 0010: water.kpi_by_district returns one row per district and time bucket of `step` (issue 9,
-- bench/README.md "Grafana panel queries"; same name, arguments and columns as 0009).
--
-- With All selected the bucketed district panels (readings per interval, completeness, flow by
-- district) return 33-36 k points. EXPLAIN (ANALYZE) on the year database showed the rollup
-- reads themselves at 10-30 ms; most of the rest was the panels' GROUP BY and ORDER BY on
-- $__timeGroup's key, floor(extract(epoch ...)/step)*step, a numeric computed, hashed and
-- sorted for every row although the function's rows were already one per bucket (at 7 and 30
-- days). Now the function sums its rows per (district, date_bin(step, t, epoch)) itself, on
-- timestamptz keys, only where a bucket has more than one row: the rollup rows of the grain
-- equal to `step` (a day, an hour, 15 minutes) are returned as they are; the finer rows at the
-- range's ends, and the rows of a grain finer than `step` (hours in 12-hour buckets) are summed.
-- `t` is the bucket's start, the value $__timeGroup gives, so the panels select the rows as
-- they are and order them by `t` (grafana/build_dashboards.py). A query that groups the rows
-- again (the boards of 0009, the hour-of-week panels grouping districts together) gets the
-- same sums.
--
-- The selected nodes of districts not wholly selected (one node picked): each node's rows are
-- summed per bucket first, then the district's nodes together. The 0009 form sorted a node's
-- year (35 k rows, 104 bytes wide) on disk with the default 4 MB work_mem; the narrow per-node
-- rows sort in memory. The windows with a flow (`roles` = 'not inflow') still need the count
-- of distinct windows over the district's nodes, as before.
--
-- The districts wholly selected are found in one pass over nodes instead of a count per
-- district. Counts summed in float8 (exact below 2^53) keep the per-group state by value.

CREATE OR REPLACE FUNCTION water.kpi_by_district(nodes text[], lo timestamptz, hi timestamptz,
                                                 step interval, roles text DEFAULT NULL)
RETURNS TABLE (district text, t timestamptz, n bigint, completeness_sum double precision,
               completeness_n bigint, flow_sum double precision, flow_n bigint,
               flow_windows bigint, inflow_volume double precision)
LANGUAGE sql STABLE
AS $$
    WITH sel AS (
        SELECT s.node_id, coalesce(s.district, 'none') AS district, s.role
        FROM water.nodes AS s WHERE s.node_id = ANY (nodes)
    ), whole AS (
        SELECT coalesce(array_agg(x.district), '{}') AS ds FROM (
            SELECT coalesce(a.district, 'none') AS district FROM water.nodes AS a
            GROUP BY 1 HAVING bool_and(a.node_id = ANY (nodes))) AS x
    ), b AS (
        SELECT CASE WHEN y.hours AND y.h_lo < y.h_hi THEN y.h_lo END AS h_lo,
               CASE WHEN y.hours AND y.h_lo < y.h_hi THEN y.h_hi END AS h_hi,
               CASE WHEN y.days AND y.d_lo < y.d_hi THEN y.d_lo END AS d_lo,
               CASE WHEN y.days AND y.d_lo < y.d_hi THEN y.d_hi END AS d_hi,
               coalesce(y.secs = 86400, false) AS day_direct,
               coalesce(y.secs = 3600, false) AS hour_direct,
               coalesce(y.secs, 0) IN (0, 900) OR y.secs < 0 AS q_direct
        FROM (SELECT extract(epoch FROM step) AS secs,
                     extract(epoch FROM step) > 0 AND extract(epoch FROM step) % 3600 = 0 AS hours,
                     extract(epoch FROM step) > 0 AND extract(epoch FROM step) % 86400 = 0 AS days,
                     date_trunc('hour', lo - interval '1 microsecond', 'UTC') + interval '1 hour'
                         AS h_lo,
                     date_trunc('hour', hi, 'UTC') AS h_hi,
                     date_trunc('day', lo - interval '1 microsecond', 'UTC') + interval '1 day'
                         AS d_lo,
                     date_trunc('day', hi, 'UTC') AS d_hi) AS y
    ), g AS (
        -- The bounds of each rollup read, for the rows returned as they are (`_one`: the
        -- grain is `step`, a row is its bucket's only one) and for those summed per bucket
        -- (`_sum`); NULL (no rows) where the read is not that one's. Bounds, not a filter
        -- column: each read stays a plain index scan under the Append, as in 0009.
        SELECT CASE WHEN b.day_direct THEN b.d_lo END AS d_lo_one,
               CASE WHEN NOT b.day_direct THEN b.d_lo END AS d_lo_sum,
               CASE WHEN b.hour_direct THEN b.h_lo END AS h_lo_one,
               CASE WHEN NOT b.hour_direct THEN b.h_lo END AS h_lo_sum,
               CASE WHEN b.q_direct THEN lo END AS q_lo_one,
               CASE WHEN NOT b.q_direct THEN lo END AS q_lo_sum
        FROM b
    )
    -- The rollup rows of the wholly selected districts, as 0009 read them (whole days, whole
    -- hours outside them, 15-minute windows outside those); first those of the grain `step`.
    -- (Hours after the last whole day and 15-minute rows after the last whole hour are never of
    -- the grain `step`: they exist only when `step` is a coarser grain.)
    SELECT r.district, r.day, r.n, r.completeness_sum, r.completeness_n, r.flow_sum, r.flow_n,
           r.flow_windows, r.inflow_volume
    FROM water.kpi_district_day AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.day >= (SELECT d_lo_one FROM g) AND r.day < (SELECT d_hi FROM b)
    UNION ALL
    SELECT r.district, r.hour, r.n, r.completeness_sum, r.completeness_n, r.flow_sum, r.flow_n,
           r.flow_windows, r.inflow_volume
    FROM water.kpi_district_hour AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.hour >= (SELECT h_lo_one FROM g) AND r.hour < (SELECT coalesce(d_lo, h_hi) FROM b)
    UNION ALL
    SELECT r.district, r.window_start, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
           r.flow_n, (r.flow_n > 0)::int::bigint, r.inflow_volume
    FROM water.kpi_district_15m AS r
    WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
      AND r.window_start >= (SELECT q_lo_one FROM g) AND r.window_start <= hi
      AND r.window_start < (SELECT coalesce(h_lo, 'infinity') FROM b)
    UNION ALL
    -- the others, summed per bucket (at a year in 12-hour buckets, 438 k hour rows)
    SELECT x.district, date_bin(step, x.t, timestamptz '1970-01-01 00:00:00+00'),
           sum(x.n::float8)::bigint, sum(x.completeness_sum),
           sum(x.completeness_n::float8)::bigint, sum(x.flow_sum),
           sum(x.flow_n::float8)::bigint, sum(x.flow_windows::float8)::bigint,
           sum(x.inflow_volume)
    FROM (
        SELECT r.district, r.day AS t, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
               r.flow_n, r.flow_windows, r.inflow_volume
        FROM water.kpi_district_day AS r
        WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
          AND r.day >= (SELECT d_lo_sum FROM g) AND r.day < (SELECT d_hi FROM b)
        UNION ALL
        SELECT r.district, r.hour, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
               r.flow_n, r.flow_windows, r.inflow_volume
        FROM water.kpi_district_hour AS r
        WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
          AND r.hour >= (SELECT h_lo_sum FROM g)
          AND r.hour < (SELECT coalesce(d_lo, h_hi) FROM b)
        UNION ALL
        SELECT r.district, r.hour, r.n, r.completeness_sum, r.completeness_n, r.flow_sum,
               r.flow_n, r.flow_windows, r.inflow_volume
        FROM water.kpi_district_hour AS r
        WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
          AND r.hour >= (SELECT d_hi FROM b) AND r.hour < (SELECT h_hi FROM b)
        UNION ALL
        SELECT r.district, r.window_start, r.n, r.completeness_sum, r.completeness_n,
               r.flow_sum, r.flow_n, (r.flow_n > 0)::int::bigint, r.inflow_volume
        FROM water.kpi_district_15m AS r
        WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
          AND r.window_start >= (SELECT q_lo_sum FROM g) AND r.window_start <= hi
          AND r.window_start < (SELECT coalesce(h_lo, 'infinity') FROM b)
        UNION ALL
        SELECT r.district, r.window_start, r.n, r.completeness_sum, r.completeness_n,
               r.flow_sum, r.flow_n, (r.flow_n > 0)::int::bigint, r.inflow_volume
        FROM water.kpi_district_15m AS r
        WHERE r.district = ANY ((SELECT ds FROM whole)::text[])
          AND r.window_start >= (SELECT h_hi FROM b) AND r.window_start <= hi) AS x
    GROUP BY 1, 2
    UNION ALL
    -- the selected nodes of the other districts, from their own rows; flow_windows (the
    -- bucket's windows with a flow) needs a count of distinct windows: 'not inflow' only
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
      AND s.district <> ALL ((SELECT ds FROM whole)::text[])
      AND q.window_start >= lo AND q.window_start <= hi
    GROUP BY 1, 2
    UNION ALL
    -- the other panels: each node's rows summed per bucket first (narrow rows, sorted in
    -- memory), then the district's selected nodes together
    SELECT s.district, x.t, sum(x.n)::bigint, sum(x.completeness_sum),
           sum(x.completeness_n)::bigint, sum(x.flow_sum), sum(x.flow_n)::bigint, NULL::bigint,
           sum(x.inflow_volume)
    FROM sel AS s
    CROSS JOIN LATERAL (
        SELECT CASE WHEN extract(epoch FROM step) > 0
                    THEN date_bin(step, q.window_start, timestamptz '1970-01-01 00:00:00+00')
                    ELSE q.window_start END AS t,
               sum(q.n) AS n, sum(q.completeness) AS completeness_sum,
               count(q.completeness) AS completeness_n,
               sum(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow') AS flow_sum,
               count(q.flow_rate_avg) FILTER (WHERE s.role IS DISTINCT FROM 'inflow') AS flow_n,
               sum(q.volume_m3) FILTER (WHERE s.role = 'inflow') AS inflow_volume
        FROM water.kpi_15m AS q
        WHERE q.node_id = s.node_id AND q.window_start >= lo AND q.window_start <= hi
        GROUP BY 1) AS x
    WHERE roles IS DISTINCT FROM 'not inflow'
      AND (roles IS NULL OR (roles = 'inflow') = coalesce(s.role = 'inflow', false))
      AND s.district <> ALL ((SELECT ds FROM whole)::text[])
    GROUP BY 1, 2
$$;
