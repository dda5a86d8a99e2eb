-- A provisioner finished the job. Only an open job completes (a completed job never changes
-- again; a job we canceled stays canceled). $1 job, $2 status, $3 completed_at, $4 error.
UPDATE provisioner_jobs
SET job_status = $2,
    completed_at = $3,
    started_at = COALESCE(started_at, $3),
    error = $4,
    updated_at = now()
WHERE id = $1
  AND job_status IN ('pending', 'running', 'canceling')
