-- A retryable failure (5xx, SMTP 4yz, timeout, connection): wait $3 seconds for the next attempt.
-- Only while this attempt still holds it. $1 delivery id, $2 error.
UPDATE notification_deliveries
SET status = 'pending', last_error = $2, lease_until = NULL,
    next_attempt_at = now() + make_interval(secs => $3::float8), updated_at = now()
WHERE id = $1 AND status = 'sending'
