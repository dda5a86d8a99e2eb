-- Whether a job was canceled before this provisioner got to it (read-only): the reconciler cancels
-- a pending create (`cancel_pending`) while its message may still be queued. A job being canceled
-- (`canceling`) counts too: nobody wants its build any more. No row: a job this database does not
-- know (published by another system); the caller runs it as before.
SELECT job_status IN ('canceling', 'canceled') OR canceled_at IS NOT NULL AS canceled,
       job_status
FROM provisioner_jobs
-- $1: the job's job_id
WHERE id = $1
