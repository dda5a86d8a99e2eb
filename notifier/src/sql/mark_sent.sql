-- The receiver accepted the delivery. Unconditional on the status: even if a notifier that found
-- the lease expired marked it interrupted meanwhile, it was sent. $1 delivery id.
UPDATE notification_deliveries
SET status = 'sent', sent_at = now(), lease_until = NULL, updated_at = now()
WHERE id = $1
