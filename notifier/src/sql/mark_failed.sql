-- Refused for good (4xx, SMTP 5yz) or out of attempts. $1 delivery id, $2 error.
UPDATE notification_deliveries
SET status = 'failed', last_error = $2, lease_until = NULL, next_attempt_at = NULL,
    updated_at = now()
WHERE id = $1 AND status = 'sending'
