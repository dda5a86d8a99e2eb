-- A provisioner job. $1 id, $2 initiator, $3 input (the provisioner.job message), $4 now,
-- $5 status ('pending' for real work; 'succeeded' for an orphan delete that needs none).
INSERT INTO provisioner_jobs (id, initiator_id, input, created_at, updated_at, job_status,
                              started_at, completed_at)
VALUES ($1, $2, $3, $4, $4, $5,
        CASE WHEN $5 = 'pending' THEN NULL ELSE $4::timestamptz END,
        CASE WHEN $5 = 'pending' THEN NULL ELSE $4::timestamptz END)
