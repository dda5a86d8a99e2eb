-- prebuilds: deliveries of notifications to people (prebuilds-notifier).
--
-- One row per (notification, recipient, channel): the notifier inserts it — the intent — before it
-- sends and marks it sent after, so a duplicated message or a restarted notifier finds the row and
-- sends nothing twice. `id` is stable across attempts: the webhook's X-Prebuilds-Delivery header
-- and the e-mail's Message-ID, for receivers that want to deduplicate themselves.
--
-- Online-safe: a new, empty table and its indexes; the foreign key takes a brief SHARE ROW
-- EXCLUSIVE lock on notification_messages (writes wait for the few milliseconds of the CREATE,
-- reads never), and no existing row is rewritten.
CREATE TABLE notification_deliveries (
    id              uuid PRIMARY KEY,
    notification_id uuid NOT NULL REFERENCES notification_messages (id) ON DELETE CASCADE,
    channel         text NOT NULL CHECK (channel IN ('webhook', 'email')),
    -- The e-mail address, or the webhook's origin (scheme://host:port, never its path or query,
    -- which may carry a token); '' when there is no one to send to (a user without an address).
    recipient       text NOT NULL,
    -- pending: waiting for its next attempt (after a retryable failure);
    -- sending: an attempt is under way until lease_until;
    -- sent: the receiver accepted it (terminal);
    -- failed: refused for good (4xx, SMTP 5yz) or out of attempts; a new delivery of the message
    --         (a dead-letter replay) tries again;
    -- interrupted: a notifier stopped during an attempt (lease expired): the receiver may or may
    --              not have it, so it is not sent again (terminal: at most once);
    -- skipped: nothing to send to (terminal).
    status          text NOT NULL
        CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'interrupted', 'skipped')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    lease_until     timestamptz,
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (notification_id, recipient, channel)
);
-- `prebuildsctl notifications list --status S`, newest first.
CREATE INDEX notification_deliveries_status ON notification_deliveries (status, created_at);
