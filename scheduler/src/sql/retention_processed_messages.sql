-- Retention (scheduler/src/retention.rs): one bounded batch of this table's rows past its window.
-- Deletes at most $2 rows older than $1. Rows that old are written by no one any more, so no
-- row lock is taken up front (that would need UPDATE rights); the DELETE waits for one if need be.
-- Rows: ids of applied messages, the idempotency record of every consumer.
DELETE FROM processed_messages p
USING (SELECT consumer, message_id FROM processed_messages
       WHERE processed_at < $1
       ORDER BY processed_at
       LIMIT $2) old
WHERE p.consumer = old.consumer AND p.message_id = old.message_id;
