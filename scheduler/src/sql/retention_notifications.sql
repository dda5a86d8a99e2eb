-- Retention (scheduler/src/retention.rs): one bounded batch of this table's rows past its window.
-- Deletes at most $2 rows older than $1. Rows that old are written by no one any more, so no
-- row lock is taken up front (that would need UPDATE rights); the DELETE waits for one if need be.
-- Rows: notifications whose every delivery has settled; their deliveries go with them
-- (ON DELETE CASCADE). One still pending or sending is kept whatever its age.
DELETE FROM notification_messages n
USING (SELECT m.id FROM notification_messages m
       WHERE m.created_at < $1
         AND NOT EXISTS (SELECT 1 FROM notification_deliveries d
                         WHERE d.notification_id = m.id AND d.status IN ('pending', 'sending'))
       ORDER BY m.created_at
       LIMIT $2) old
WHERE n.id = old.id;
