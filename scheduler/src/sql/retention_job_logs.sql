-- Retention (scheduler/src/retention.rs): one bounded batch of this table's rows past its window.
-- Deletes at most $2 rows older than $1. Rows that old are written by no one any more, so no
-- row lock is taken up front (that would need UPDATE rights); the DELETE waits for one if need be.
-- Rows: log lines of jobs that have ended; an open job keeps all of its lines.
DELETE FROM provisioner_job_logs l
USING (SELECT line.id FROM provisioner_job_logs line
       JOIN provisioner_jobs j ON j.id = line.job_id
       WHERE line.created_at < $1
         AND j.job_status IN ('succeeded', 'failed', 'canceled')
       ORDER BY line.created_at
       LIMIT $2) old
WHERE l.id = old.id;
