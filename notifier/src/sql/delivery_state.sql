-- Where the delivery of (notification, recipient, channel) stands, and how long until its lease
-- runs out or its next attempt is due (seconds, 0 when past). $1 notification, $2 channel,
-- $3 recipient.
SELECT id, status, attempts,
       lease_until IS NOT NULL AND lease_until <= now() AS lease_expired,
       greatest(extract(epoch FROM coalesce(lease_until, now()) - now()), 0)::float8 AS lease_left,
       greatest(extract(epoch FROM coalesce(next_attempt_at, now()) - now()), 0)::float8 AS next_in
FROM notification_deliveries
WHERE notification_id = $1 AND channel = $2 AND recipient = $3
