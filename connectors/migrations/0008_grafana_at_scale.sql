-- 0008: Grafana's panels at a year of 15-minute data for 500 nodes (bench/grafana_queries.py,
-- bench/README.md "Grafana panel queries", issue 9).
--
-- 1. forecast_selected (0006) chose the model of every (series, issue) of the whole table at
-- every read: its MATERIALIZED step cannot see the panel's series or time range, so a panel
-- reading one issue paid for all of them (7-25 s at 30 days x 500 series, growing with every
-- day kept). Now the choices are kept in the materialized view water.forecast_choice, refreshed
-- by water.refresh_forecast_choice() (retention calls it: `waterflow db retention` and the live
-- process's schedule), and forecast_selected joins the forecast rows to
--   (a) the kept choices, made with the current selection window, and
--   (b) choices made at read time, exactly as before, for the issues the last refresh did not
--       see: those with a first-hour row (target_ts = issued_at, as the pipeline writes every
--       issue) less than 3 days older than the newest kept issue and not kept; or every issue
--       while nothing is kept with the current window (never refreshed, or the window changed).
-- A reader sees the same choices as before, except that an issue written more than 3 days
-- behind the newest kept one (or without a first-hour row) shows after the next refresh, and a
-- kept choice does not follow accuracy rows rewritten after the refresh (after re-replaying
-- old data, run SELECT water.refresh_forecast_choice()).
--
-- 2. The data-quality board's flagged readings: a partial index on the few flagged readings.
--
-- 3. No JIT for Grafana's role in this database. The boards' aggregates over many rows cost
-- enough for PostgreSQL to compile them, and compiling took 0.3-3 s (once 24 s) per query,
-- more than running them (bench/results/grafana_explain_before.md).

-- The choice of 0006 for one issue: the model with the lowest n-weighted MAE over the accuracy
-- periods in [issued_at - win, issued_at); models without accuracy last; ties by name. The
-- issue's models are those of its first target hour.
CREATE FUNCTION water.choose_forecast_model(series text, issued timestamptz, win interval)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.model
    FROM water.forecasts AS m
    LEFT JOIN LATERAL (
        SELECT sum(a.mae * a.n) / nullif(sum(a.n), 0) AS mae
        FROM water.forecast_accuracy AS a
        WHERE a.node_id = series AND a.model = m.model
          AND a.period_start < issued AND a.period_start >= issued - win
    ) AS acc ON true
    WHERE m.node_id = series AND m.issued_at = issued
      AND m.target_ts = (SELECT min(f2.target_ts) FROM water.forecasts AS f2
                         WHERE f2.node_id = series AND f2.issued_at = issued)
    ORDER BY acc.mae ASC NULLS LAST, m.model
    LIMIT 1
$$;

-- The choice, and the boards' accuracy panels, read a series' accuracy over a range of days:
-- an index-only range (the key starts with model and horizon_h).
CREATE INDEX IF NOT EXISTS forecast_accuracy_series_period_idx
    ON water.forecast_accuracy (node_id, period_start) INCLUDE (model, horizon_h, mae, mape, n);
-- One entry per issue and model (the pipeline's first target hour is the issue time): finds
-- the issues written since the last refresh without reading their 168 hours.
CREATE INDEX IF NOT EXISTS forecasts_issue_idx
    ON water.forecasts (issued_at, node_id) WHERE target_ts = issued_at;

CREATE MATERIALIZED VIEW water.forecast_choice AS
SELECT i.node_id, i.issued_at, w.selection_window,
       water.choose_forecast_model(i.node_id, i.issued_at, w.selection_window) AS model
FROM (SELECT DISTINCT node_id, issued_at FROM water.forecasts) AS i
CROSS JOIN water.forecast_settings AS w
WITH DATA;
-- REFRESH ... CONCURRENTLY needs a unique index; readers join on it.
CREATE UNIQUE INDEX forecast_choice_key ON water.forecast_choice (node_id, issued_at);
CREATE INDEX forecast_choice_issued_idx ON water.forecast_choice (issued_at);

-- SECURITY DEFINER (owned by the migrating user, the view's owner), so water_writer, which runs
-- retention, may refresh it without owning it. CONCURRENTLY: Grafana keeps reading meanwhile.
CREATE FUNCTION water.refresh_forecast_choice()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    REFRESH MATERIALIZED VIEW CONCURRENTLY water.forecast_choice;
    RETURN (SELECT count(*) FROM water.forecast_choice);
END
$$;
REVOKE ALL ON FUNCTION water.refresh_forecast_choice() FROM PUBLIC;

-- The choices made at read time: computed once per query (a plpgsql function's result is
-- materialized), so neither re-evaluated for every forecast row, nor a CTE in the view, which
-- would keep the planner from joining the view by its key (a panel's latest issue per series
-- joined the whole table: 5 s).
CREATE FUNCTION water.forecast_live_choices()
RETURNS TABLE (node_id text, issued_at timestamptz, model text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    win interval;
    newest timestamptz;
BEGIN
    SELECT s.selection_window INTO win FROM water.forecast_settings AS s;
    IF NOT EXISTS (SELECT 1 FROM water.forecast_choice AS c WHERE c.selection_window = win) THEN
        RETURN QUERY
            SELECT i.node_id, i.issued_at,
                   water.choose_forecast_model(i.node_id, i.issued_at, win)
            FROM (SELECT DISTINCT f.node_id, f.issued_at FROM water.forecasts AS f) AS i;
        RETURN;
    END IF;
    SELECT max(c.issued_at) INTO newest FROM water.forecast_choice AS c;
    RETURN QUERY
        SELECT n.node_id, n.issued_at, water.choose_forecast_model(n.node_id, n.issued_at, win)
        FROM water.forecasts AS n
        WHERE n.target_ts = n.issued_at AND n.issued_at > newest - interval '3 days'
          AND NOT EXISTS (SELECT 1 FROM water.forecast_choice AS c
                          WHERE c.node_id = n.node_id AND c.issued_at = n.issued_at)
        GROUP BY n.node_id, n.issued_at;
END
$$;

CREATE OR REPLACE VIEW water.forecast_selected AS
SELECT f.node_id, f.issued_at, f.target_ts, f.model, f.yhat, f.yhat_lo, f.yhat_hi
FROM water.forecasts AS f
JOIN (
    SELECT c.node_id, c.issued_at, c.model
    FROM water.forecast_choice AS c
    WHERE c.selection_window = (SELECT s.selection_window FROM water.forecast_settings AS s)
    UNION ALL
    SELECT l.node_id, l.issued_at, l.model FROM water.forecast_live_choices() AS l
) AS c ON f.node_id = c.node_id AND f.issued_at = c.issued_at AND f.model = c.model;

-- "Accepted readings with a flag" reads only readings with flags (a few percent of them); the
-- panel's query says cardinality(r.flags) > 0 so that this index applies.
-- INCLUDE: answered from the index alone (the flagged readings are spread over every page).
CREATE INDEX IF NOT EXISTS readings_flagged_idx ON water.readings (ts) INCLUDE (node_id, flags)
    WHERE cardinality(flags) > 0;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        GRANT SELECT ON water.forecast_choice, water.forecast_selected TO water_reader;
        -- Applies to the reader's new sessions in this database only (not to SET ROLE).
        BEGIN
            EXECUTE format('ALTER ROLE water_reader IN DATABASE %I SET jit = off',
                           current_database());
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'not allowed to set jit = off for water_reader in %: skipped',
                current_database();
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        GRANT SELECT ON water.forecast_choice TO water_writer;
        GRANT EXECUTE ON FUNCTION water.refresh_forecast_choice() TO water_writer;
    END IF;
END
$$;
