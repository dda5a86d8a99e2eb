-- The job reaper's one rule (docs/reconciliation.md "Provisioner jobs that never finish"), for one bounded batch: fail the open jobs a
-- provisioner has gone silent on.
--   * running (or canceling): no provisioner event for the hung timeout. `updated_at` is moved by
--     every state event and, at most once a second, by log lines (worker/src/sql/job_log_event.sql),
--     so it is the time of the last event the database heard, on the database's clock.
--   * pending: not started within the pending timeout of its creation.
-- Rows another transaction holds (an event being applied right now) are skipped, not waited for:
-- that job is not silent. Each reaped job's preset gets a reconcile through the outbox in the same
-- transaction (the caller's), so the freed slot is refilled without waiting for the next tick.
-- $1 now (the caller's clock; NULL = the database's), $2 hung timeout (s), $3 pending timeout (s),
-- $4 batch size, $5 error of a hung job, $6 error of a pending job.
WITH clock AS (
    SELECT COALESCE($1::timestamptz, clock_timestamp()) AS now
),
due AS (
    SELECT j.id, j.job_status AS was
    FROM provisioner_jobs j, clock
    WHERE (j.job_status IN ('running', 'canceling')
           AND j.updated_at < clock.now - make_interval(secs => $2::float8))
       OR (j.job_status = 'pending'
           AND j.created_at < clock.now - make_interval(secs => $3::float8))
    ORDER BY j.created_at
    LIMIT $4
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE provisioner_jobs j
SET job_status   = 'failed',
    error        = CASE WHEN due.was = 'pending' THEN $6::text ELSE $5::text END,
    completed_at = clock.now,
    updated_at   = clock.now
FROM due, clock
WHERE j.id = due.id
RETURNING j.id AS job_id,
          due.was,
          (SELECT b.template_version_preset_id FROM workspace_builds b WHERE b.job_id = j.id) AS preset_id
