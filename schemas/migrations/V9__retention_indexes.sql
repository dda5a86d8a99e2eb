-- prebuilds: indexes for retention (scheduler/src/retention.rs), which deletes the oldest rows of
-- each growing table in bounded batches: without an index on the age column every batch would scan
-- the whole table.
--
-- Each index is built in the migration's transaction (the migration runner wraps every file in
-- one), so writes to its table wait while it builds — seconds per million rows. lock_timeout
-- makes the migration fail fast, instead of queueing every writer behind it, when a long
-- transaction holds the table: run it again at a quieter moment.
SET LOCAL lock_timeout = '10s';
CREATE INDEX IF NOT EXISTS processed_messages_processed_at ON processed_messages (processed_at);
CREATE INDEX IF NOT EXISTS claim_requests_created_at ON claim_requests (created_at);
CREATE INDEX IF NOT EXISTS provisioner_job_logs_created_at ON provisioner_job_logs (created_at);
CREATE INDEX IF NOT EXISTS notification_messages_created_at ON notification_messages (created_at);
