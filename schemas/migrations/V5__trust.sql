-- prebuilds: trust boundaries (SPEC.md §9 "Trust").
--
-- Online-safe on PostgreSQL 11+: a column added with a constant default (or none) is a catalog
-- change that rewrites no row, and the new table and index start empty. Nothing here takes a lock
-- longer than an instant on a live table.

-- A deleted user keeps its row (workspace and audit history refer to it) but may claim nothing.
ALTER TABLE users ADD COLUMN deleted boolean NOT NULL DEFAULT false;

-- The request a stored claim reply answered (the claim request's `data` as JSON text, exactly as
-- the worker serialises it), so a request id reused for another user or another body is refused
-- (`request_conflict`) instead of answered with the first reply. Text, not jsonb: jsonb cannot
-- hold the escaped NUL of a hostile (and rejected) workspace name. NULL for requests recorded
-- before this migration: those compare by user only.
ALTER TABLE claim_requests ADD COLUMN request text;

-- Who changed what through `prebuildsctl`, and when. Append-only by convention: the operator
-- writes a row in the same transaction as every change it makes; nothing updates or deletes rows.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    -- Who acted: the actor given with --actor / PREBUILDS_ACTOR, else the OS user.
    actor       text NOT NULL,
    -- The OS user that ran prebuildsctl (equal to actor unless an actor was given).
    os_user     text NOT NULL,
    -- The database role the change was made with (cannot be chosen by the client).
    db_role     text NOT NULL DEFAULT current_user,
    -- The command, e.g. `template push`, `pause`, `jobs cancel`.
    action      text NOT NULL,
    -- The arguments given on the command line or in the environment, by name (never a secret:
    -- connection settings are not command arguments and are not recorded).
    arguments   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_occurred_at ON audit_log (occurred_at);

-- Which provisioner took a job: the broker user (the validated AMQP `user_id`) whose job_started
-- moved it to running. The job's later events must come from that same broker user; NULL (not
-- started, or started by an event without user_id) binds nothing.
ALTER TABLE provisioner_jobs ADD COLUMN started_by text;
