-- Retention (scheduler/src/retention.rs): one bounded batch of this table's rows past its window.
-- Deletes at most $2 rows older than $1. Rows that old are written by no one any more, so no
-- row lock is taken up front (that would need UPDATE rights); the DELETE waits for one if need be.
-- Rows: claim outcomes by request id (a retried claim's answer) and the claim history.
DELETE FROM claim_requests c
USING (SELECT request_id FROM claim_requests
       WHERE created_at < $1
       ORDER BY created_at
       LIMIT $2) old
WHERE c.request_id = old.request_id;
