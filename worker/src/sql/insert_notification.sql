-- One notification per (build, recipient): the dedupe key makes a redelivered event a no-op.
-- Returns the row only when it was inserted now. $1 id, $2 template, $3 user, $4 payload, $5 key.
INSERT INTO notification_messages (id, notification_template_id, user_id, payload, dedupe_key)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id
