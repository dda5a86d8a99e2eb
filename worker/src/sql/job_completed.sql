-- A provisioner finished the job. Only a started, open job gets here (prebuilds_core::admit,
-- under the job row's lock taken by job_for_event.sql): a completed job never changes again, and
-- a job we canceled stays canceled. $1 job, $2 status, $3 completed_at, $4 error.
UPDATE provisioner_jobs
SET job_status = $2,
    completed_at = $3,
    error = $4,
    updated_at = now()
WHERE id = $1
