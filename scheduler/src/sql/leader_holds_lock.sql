-- Does this session still hold the leader lock? A bigint advisory lock shows up in pg_locks split
-- into classid (high 32 bits) and objid (low 32 bits), with objsubid = 1. $1 = the lock key.
SELECT EXISTS (
    SELECT 1
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.pid = pg_backend_pid()                              -- held by this very session
      AND l.granted                                             -- granted, not waited for
      AND l.objsubid = 1                                        -- the single-bigint key form
      AND ((l.classid::bigint << 32) | l.objid::bigint) = $1    -- our key
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
