-- The attempt's lease ran out: the notifier holding it stopped (killed, or cut off from the
-- database) between writing the intent and recording the outcome. The receiver may or may not
-- have the message; it is not sent again (at most once). $1 delivery id.
UPDATE notification_deliveries
SET status = 'interrupted', lease_until = NULL, updated_at = now(),
    last_error = 'a notifier stopped during attempt ' || attempts
                 || '; the receiver may or may not have it, so it is not sent again'
WHERE id = $1 AND status = 'sending' AND lease_until <= now()
