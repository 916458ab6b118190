-- 0006: forecast_selected chooses per node on *recent* accuracy, over a configurable window.
-- Until now the view weighed every accuracy period before the issue, however old. The window
-- is a one-row setting, so Grafana and every reader see the same choice:
--     UPDATE water.forecast_settings SET selection_window = interval '14 days';
-- An accuracy row's period is the local day of its actuals (dataflows/forecast.py), so a period
-- that started before the issue has ended by the issue (issues are at local midnights): the
-- choice uses only what was known when the forecast was issued.
CREATE TABLE water.forecast_settings (
    only_row          boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    selection_window  interval NOT NULL DEFAULT interval '28 days'
        CHECK (selection_window > interval '0')
);
INSERT INTO water.forecast_settings DEFAULT VALUES;

-- Same columns as before. Per (node, issue): the model with the lowest n-weighted MAE over the
-- accuracy periods in [issued_at - selection_window, issued_at); models without any accuracy
-- in the window come last, ties broken by model name. An issue's models are those of its first
-- target hour (models issued together cover the same hours; reading one row per model instead
-- of all 168 makes the view 20 times faster). The choice is made once per issue and
-- then joined to the forecast rows: MATERIALIZED keeps the planner from re-evaluating it for
-- every forecast row, which it did (300 times slower) on tables without statistics yet.
CREATE OR REPLACE VIEW water.forecast_selected AS
WITH chosen AS MATERIALIZED (
    SELECT i.node_id, i.issued_at, sel.model
    FROM (SELECT DISTINCT node_id, issued_at FROM water.forecasts) AS i
    CROSS JOIN LATERAL (
        SELECT m.model
        FROM water.forecasts AS m
        LEFT JOIN LATERAL (
            SELECT sum(a.mae * a.n) / nullif(sum(a.n), 0) AS mae
            FROM water.forecast_accuracy AS a
            WHERE a.node_id = i.node_id AND a.model = m.model
              AND a.period_start < i.issued_at
              AND a.period_start
                  >= i.issued_at - (SELECT selection_window FROM water.forecast_settings)
        ) AS acc ON true
        WHERE m.node_id = i.node_id AND m.issued_at = i.issued_at
          AND m.target_ts = (
              SELECT min(f2.target_ts) FROM water.forecasts AS f2
              WHERE f2.node_id = i.node_id AND f2.issued_at = i.issued_at
          )
        ORDER BY acc.mae ASC NULLS LAST, m.model
        LIMIT 1
    ) AS sel
)
SELECT f.node_id, f.issued_at, f.target_ts, f.model, f.yhat, f.yhat_lo, f.yhat_hi
FROM chosen AS c
JOIN water.forecasts AS f
  ON f.node_id = c.node_id AND f.issued_at = c.issued_at AND f.model = c.model;

-- The writer only reads the setting; an operator (the schema's owner) changes it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        GRANT SELECT ON water.forecast_settings, water.forecast_selected TO water_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        REVOKE INSERT, UPDATE, DELETE ON water.forecast_settings FROM water_writer;
        GRANT SELECT ON water.forecast_settings TO water_writer;
    END IF;
END
$$;
