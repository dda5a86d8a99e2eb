-- The row a provisioner decides a delivered job by (admission.rs), and polls while the job runs
-- (a cancel requested meanwhile). Read-only. $1: the job's job_id.
SELECT job_status,
       canceled_at IS NOT NULL AS cancel_requested
FROM provisioner_jobs
WHERE id = $1
