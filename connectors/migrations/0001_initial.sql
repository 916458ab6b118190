-- 0001: the tables of the contract (DESIGN.md, "The contract, in detail").
-- Columns follow dataflows/tables.py SCHEMAS; keys follow tables.KEYS. Every time is timestamptz.
-- Applied by connectors.warm_postgres.migrate() in one transaction, recorded in water.schema_migrations.

CREATE TABLE water.nodes (
    node_id   text PRIMARY KEY,
    name      text,
    district  text,
    role      text,
    lat       double precision,
    lon       double precision,
    source    text
);
CREATE INDEX nodes_district_idx ON water.nodes (district);

CREATE TABLE water.readings (
    node_id       text NOT NULL,
    ts            timestamptz NOT NULL,
    flow_rate     double precision,
    pressure      double precision,
    temperature   double precision,
    total_flow    double precision,
    level         double precision,
    chlorine      double precision,
    ph            double precision,
    turbidity     double precision,
    conductivity  double precision,
    redox         double precision,
    quality       double precision,
    flags         text[],
    anomaly_score double precision,
    source        text,
    run_id        text,
    -- The primary key is also the (node_id, ts) index every node-detail panel uses.
    PRIMARY KEY (node_id, ts)
);
-- Network-wide time-range panels scan by ts alone; BRIN stays tiny and costs little on insert
-- because replays and live data arrive roughly in time order.
CREATE INDEX readings_ts_brin ON water.readings USING brin (ts);

CREATE TABLE water.kpi_15m (
    node_id            text NOT NULL,
    window_start       timestamptz NOT NULL,
    n                  bigint,
    completeness       double precision,
    flow_rate_avg      double precision,
    flow_rate_min      double precision,
    flow_rate_max      double precision,
    flow_rate_std      double precision,
    pressure_avg       double precision,
    pressure_min       double precision,
    pressure_max       double precision,
    pressure_std       double precision,
    temperature_avg    double precision,
    temperature_min    double precision,
    temperature_max    double precision,
    temperature_std    double precision,
    total_flow_avg     double precision,
    total_flow_min     double precision,
    total_flow_max     double precision,
    total_flow_std     double precision,
    level_avg          double precision,
    level_min          double precision,
    level_max          double precision,
    level_std          double precision,
    chlorine_avg       double precision,
    chlorine_min       double precision,
    chlorine_max       double precision,
    chlorine_std       double precision,
    ph_avg             double precision,
    ph_min             double precision,
    ph_max             double precision,
    ph_std             double precision,
    turbidity_avg      double precision,
    turbidity_min      double precision,
    turbidity_max      double precision,
    turbidity_std      double precision,
    conductivity_avg   double precision,
    conductivity_min   double precision,
    conductivity_max   double precision,
    conductivity_std   double precision,
    redox_avg          double precision,
    redox_min          double precision,
    redox_max          double precision,
    redox_std          double precision,
    volume_m3          double precision,
    quality_avg        double precision,
    score_max          double precision,
    PRIMARY KEY (node_id, window_start)
);
CREATE INDEX kpi_15m_window_start_brin ON water.kpi_15m USING brin (window_start);

CREATE TABLE water.kpi_daily (
    node_id             text NOT NULL,
    day                 date NOT NULL,
    n                   bigint,
    completeness        double precision,
    volume_m3           double precision,
    mnf                 double precision,  -- minimum night flow, L/s
    pressure_compliance double precision,  -- share of readings in the service band, 0..1
    flow_rate_avg       double precision,
    flow_rate_min       double precision,
    flow_rate_max       double precision,
    pressure_avg        double precision,
    pressure_min        double precision,
    pressure_max        double precision,
    PRIMARY KEY (node_id, day)
);

CREATE TABLE water.district_balance (
    district        text NOT NULL,
    period          text NOT NULL,  -- '15m' | 'day' | ...: the length of the balance period
    period_start    timestamptz NOT NULL,
    inflow_m3       double precision,
    consumption_m3  double precision,
    loss_m3         double precision,
    nrw             double precision,  -- non-revenue water share, 0..1
    PRIMARY KEY (district, period, period_start)
);

CREATE TABLE water.anomalies (
    anomaly_id   text PRIMARY KEY,
    node_id      text NOT NULL,
    started_at   timestamptz NOT NULL,
    ended_at     timestamptz,  -- NULL while the incident is open
    peak_score   double precision,
    kind         text,
    measurement  text,
    expected_lo  double precision,
    expected_hi  double precision,
    observed     double precision
);
CREATE INDEX anomalies_node_started_idx ON water.anomalies (node_id, started_at);
-- The "active anomalies" panels and alerts only look at open incidents.
CREATE INDEX anomalies_open_idx ON water.anomalies (started_at) WHERE ended_at IS NULL;

CREATE TABLE water.forecasts (
    node_id    text NOT NULL,
    issued_at  timestamptz NOT NULL,
    target_ts  timestamptz NOT NULL,
    model      text NOT NULL,
    yhat       double precision,
    yhat_lo    double precision,
    yhat_hi    double precision,
    PRIMARY KEY (node_id, issued_at, target_ts, model)
);

CREATE TABLE water.forecast_accuracy (
    node_id       text NOT NULL,
    model         text NOT NULL,
    horizon_h     integer NOT NULL,
    period_start  timestamptz NOT NULL,
    mae           double precision,
    mape          double precision,
    n             bigint,
    PRIMARY KEY (node_id, model, horizon_h, period_start)
);

-- The model chosen per node at issue time: the one with the lowest n-weighted MAE over every
-- accuracy period that started before the forecast was issued (so the choice only uses what was
-- known then); models without any accuracy yet come last, ties broken by model name.
CREATE VIEW water.forecast_selected AS
SELECT f.node_id, f.issued_at, f.target_ts, f.model, f.yhat, f.yhat_lo, f.yhat_hi
FROM (SELECT DISTINCT node_id, issued_at FROM water.forecasts) AS i
CROSS JOIN LATERAL (
    SELECT m.model
    FROM (
        SELECT DISTINCT f2.model
        FROM water.forecasts AS f2
        WHERE f2.node_id = i.node_id AND f2.issued_at = i.issued_at
    ) AS m
    LEFT JOIN LATERAL (
        SELECT sum(a.mae * a.n) / nullif(sum(a.n), 0) AS mae
        FROM water.forecast_accuracy AS a
        WHERE a.node_id = i.node_id AND a.model = m.model AND a.period_start < i.issued_at
    ) AS acc ON true
    ORDER BY acc.mae ASC NULLS LAST, m.model
    LIMIT 1
) AS sel
JOIN water.forecasts AS f
  ON f.node_id = i.node_id AND f.issued_at = i.issued_at AND f.model = sel.model;

CREATE TABLE water.quarantine (
    id             text PRIMARY KEY,
    run_id         text,
    source         text,
    line           bigint,
    node_id        text,
    ts             timestamptz,
    measurement    text,
    reason         text,
    raw            text,
    whole_reading  boolean,
    received_at    timestamptz
);
CREATE INDEX quarantine_run_idx ON water.quarantine (run_id);
CREATE INDEX quarantine_received_brin ON water.quarantine USING brin (received_at);

CREATE TABLE water.ingest_runs (
    run_id              text PRIMARY KEY,
    started_at          timestamptz,
    finished_at         timestamptz,
    source              text,
    rows_in             bigint,
    accepted            bigint,
    quarantined         bigint,
    duplicates          bigint,
    values_quarantined  bigint,
    late                bigint
);
