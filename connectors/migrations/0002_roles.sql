-- 0002: the two roles of DESIGN.md: water_writer (the dataflows) and water_reader (Grafana,
-- SELECT only). Roles are cluster-wide, so they are created only if missing, and only if the
-- migrating user may create roles; otherwise this migration only grants to roles that already
-- exist (an administrator can create them later and re-grant by hand). The roles get LOGIN
-- without a password: the operator sets one (ALTER ROLE ... PASSWORD) where auth needs it.
DO $$
DECLARE
    may_create boolean;
    r text;
BEGIN
    SELECT rolsuper OR rolcreaterole INTO may_create FROM pg_roles WHERE rolname = current_user;
    FOREACH r IN ARRAY ARRAY['water_writer', 'water_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            IF may_create THEN
                BEGIN
                    EXECUTE format('CREATE ROLE %I LOGIN', r);
                EXCEPTION WHEN duplicate_object OR unique_violation THEN
                    -- another database's migration created it at the same moment
                    NULL;
                END;
            ELSE
                RAISE NOTICE 'role % does not exist and % may not create roles: skipped', r, current_user;
            END IF;
        END IF;
    END LOOP;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_reader') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO water_reader', current_database());
        GRANT USAGE ON SCHEMA water TO water_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA water TO water_reader;
        -- tables of later migrations (created by this same user) are readable too
        ALTER DEFAULT PRIVILEGES IN SCHEMA water GRANT SELECT ON TABLES TO water_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'water_writer') THEN
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO water_writer', current_database());
        GRANT USAGE ON SCHEMA water TO water_writer;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA water TO water_writer;
        ALTER DEFAULT PRIVILEGES IN SCHEMA water
            GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO water_writer;
    END IF;
END
$$;
