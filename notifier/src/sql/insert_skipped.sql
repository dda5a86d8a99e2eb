-- Nothing to send to on this channel (a user without an e-mail address): recorded once.
-- $1 delivery id, $2 notification, $3 channel, $4 why.
INSERT INTO notification_deliveries (id, notification_id, channel, recipient, status, last_error)
VALUES ($1, $2, $3, '', 'skipped', $4)
ON CONFLICT (notification_id, recipient, channel) DO NOTHING
