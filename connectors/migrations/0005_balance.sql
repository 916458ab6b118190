-- 0005: a water balance that survives bad meters (hourly and daily periods), minimum night flow
-- per district with its baseline and trend, the estimated leak rate, the daily peak hour and
-- the infrastructure leakage index. Hour rows leave the day-only columns NULL.
ALTER TABLE water.district_balance
    ADD COLUMN IF NOT EXISTS outflow_m3 double precision,
    ADD COLUMN IF NOT EXISTS system_input_m3 double precision,
    ADD COLUMN IF NOT EXISTS filled_share double precision,  -- estimated share, 0..1
    ADD COLUMN IF NOT EXISTS estimated boolean,  -- filled_share > 0.5
    ADD COLUMN IF NOT EXISTS mnf_lps double precision,
    ADD COLUMN IF NOT EXISTS mnf_baseline_lps double precision,
    ADD COLUMN IF NOT EXISTS mnf_trend_lps_per_day double precision,
    ADD COLUMN IF NOT EXISTS leak_lps double precision,
    ADD COLUMN IF NOT EXISTS peak_hour smallint,  -- local hour, 0..23
    ADD COLUMN IF NOT EXISTS peak_lps double precision,
    ADD COLUMN IF NOT EXISTS pressure_m double precision,
    ADD COLUMN IF NOT EXISTS ili double precision;

-- Balance rows before this migration were daily: system input was the inflow then.
UPDATE water.district_balance
SET system_input_m3 = inflow_m3, outflow_m3 = 0
WHERE system_input_m3 IS NULL AND period = 'day';

-- Grafana reads the hour-of-week pattern and the night flow by district and time.
CREATE INDEX IF NOT EXISTS district_balance_period_idx
    ON water.district_balance (period, period_start);
