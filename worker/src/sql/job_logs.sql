-- Append log lines of a job. $1 job, $2..$5 parallel arrays (created_at, level, stage, output).
INSERT INTO provisioner_job_logs (job_id, created_at, level, stage, output)
SELECT $1, l.created_at, l.level, l.stage, l.output
FROM unnest($2::timestamptz[], $3::text[], $4::text[], $5::text[]) AS l(created_at, level, stage, output)
