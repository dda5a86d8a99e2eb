-- A `job_log` event, whole, in one statement (one round trip, its own transaction): record the
-- event's id and append its lines, only for a known job and only the first time the id is seen.
-- Log lines need neither the job row's lock nor its build: they change no state, and each line
-- carries its own time. An unknown job records nothing, so a redelivery is still refused.
-- A log line is also the sign of life of a running job: it moves the job's `updated_at`, which the
-- job reaper reads as "the last provisioner event" (scheduler/src/sql/reap_jobs.sql). At most once
-- a second per job, and only for an open job, so a chatty build does not rewrite its row per batch
-- (a row that is not due is not locked: the WHERE fails before the update).
-- $1 job id, $2 consumer, $3 event id, $4..$7 parallel arrays (created_at, level, stage, output).
WITH job AS (
    SELECT id FROM provisioner_jobs WHERE id = $1
),
recorded AS (
    INSERT INTO processed_messages (consumer, message_id)
    SELECT $2, $3 FROM job
    ON CONFLICT DO NOTHING
    RETURNING 1
),
appended AS (
    INSERT INTO provisioner_job_logs (job_id, created_at, level, stage, output)
    SELECT $1, l.created_at, l.level, l.stage, l.output
    FROM unnest($4::timestamptz[], $5::text[], $6::text[], $7::text[])
         AS l(created_at, level, stage, output)
    WHERE EXISTS (SELECT 1 FROM recorded)
    RETURNING 1
),
heard AS (
    UPDATE provisioner_jobs
    SET updated_at = now()
    WHERE id = $1
      AND job_status IN ('running', 'canceling')
      AND updated_at < now() - interval '1 second'
      AND EXISTS (SELECT 1 FROM recorded)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM job)      AS known,
       EXISTS (SELECT 1 FROM recorded) AS first_time,
       (SELECT count(*) FROM appended) AS lines
