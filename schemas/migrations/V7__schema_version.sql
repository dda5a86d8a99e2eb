-- prebuilds: the schema version a service can read at start-up (UPGRADING.md).
--
-- A service refuses to start against a schema older than the newest migration it was built with,
-- telling the operator to run `prebuildsctl migrate`. It learns the version from this function,
-- not from refinery's history table: the service roles have no grant on that table (least
-- privilege), and a function owned by the operator that runs with its rights answers them without
-- one. A database without the function is older than this migration, which is an answer too.
--
-- Online-safe: a new function takes no lock on any table. Every migration starts by bounding how
-- long it may wait for a lock, so a migration stuck behind a long transaction fails (and is
-- retried by the operator) instead of queueing every worker's statement behind it.
SET LOCAL lock_timeout = '5s';

CREATE FUNCTION prebuilds_schema_version() RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER
    -- A SECURITY DEFINER function must not resolve names through a caller's search_path.
    SET search_path = pg_catalog, public
    AS $$ SELECT max(version) FROM public.refinery_schema_history $$;
