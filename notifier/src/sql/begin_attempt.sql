-- Takes the delivery of (notification, recipient, channel) for one attempt — the intent, written
-- before anything is sent: inserts it, or takes it over when it waits for a retry whose backoff
-- has passed (pending) or failed before (failed: a replayed message tries again, counting from 1).
-- Returns no row when another attempt holds it (sending) or it is settled (sent, interrupted,
-- skipped): then nothing may be sent. Two notifiers racing on one key serialise on the unique
-- index; the second sees the first's row and gets no row.
-- $1 new delivery id, $2 notification, $3 channel, $4 recipient, $5 lease in seconds.
INSERT INTO notification_deliveries AS d
       (id, notification_id, channel, recipient, status, attempts, lease_until)
VALUES ($1, $2, $3, $4, 'sending', 1, now() + make_interval(secs => $5::float8))
ON CONFLICT (notification_id, recipient, channel) DO UPDATE
SET status = 'sending',
    attempts = CASE WHEN d.status = 'failed' THEN 1 ELSE d.attempts + 1 END,
    lease_until = EXCLUDED.lease_until,
    next_attempt_at = NULL,
    updated_at = now()
WHERE d.status IN ('pending', 'failed')                            -- never sent, settled or held
  AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())    -- its backoff has passed
RETURNING d.id, d.attempts
