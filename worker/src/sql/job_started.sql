-- A provisioner started the job. Only a pending job gets here (prebuilds_core::admit, under the
-- job row's lock taken by job_for_event.sql): a late or redelivered job_started never reopens a
-- completed or canceled job. The broker user that sent it (validated `user_id`, NULL when the
-- event had none) takes the job: its later events must come from it.
-- $1 job, $2 started_at, $3 publisher.
UPDATE provisioner_jobs
SET job_status = 'running', started_at = $2, started_by = $3, updated_at = now()
WHERE id = $1
