-- 0004: a run's row says where it stands. The flow writes it while it runs ('running', with
-- updated_at as a heartbeat every heartbeat_s); only the command that ran the flow marks it
-- 'finished', once every tier has committed everything, so a run killed midway is never
-- recorded as finished. A row still 'running' that missed three heartbeats is an interrupted
-- run (water.run_status says so). Rows of runs before this migration were finished runs.
ALTER TABLE water.ingest_runs
    ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'finished',
    ADD COLUMN IF NOT EXISTS updated_at timestamptz,
    ADD COLUMN IF NOT EXISTS heartbeat_s double precision DEFAULT 10;
ALTER TABLE water.ingest_runs ALTER COLUMN status SET DEFAULT 'running';

CREATE OR REPLACE VIEW water.run_status AS
SELECT r.*,
       CASE
           WHEN r.status = 'running'
               AND r.updated_at
                   < now() - make_interval(secs => 3 * coalesce(r.heartbeat_s, 10) + 2)
               THEN 'interrupted'
           ELSE r.status
       END AS state
FROM water.ingest_runs AS r;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        GRANT SELECT ON water.run_status TO water_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        GRANT SELECT ON water.run_status TO water_writer;
    END IF;
END
$$;
