-- A provisioner started the job. Only a pending job moves to running: a late or redelivered
-- job_started never reopens a completed or canceled job. $1 job, $2 started_at.
UPDATE provisioner_jobs
SET job_status = 'running', started_at = $2, updated_at = now()
WHERE id = $1
  AND job_status = 'pending'
