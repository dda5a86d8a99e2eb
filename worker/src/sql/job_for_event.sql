-- One round trip per event: record its id (idempotency) and lock the job it is about, so events of
-- one job apply one at a time, with its build and workspace. No row = unknown job (the caller rolls
-- back, so the id stays unrecorded). $1 job id, $2 consumer, $3 event id.
WITH recorded AS (
    INSERT INTO processed_messages (consumer, message_id) VALUES ($2, $3)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM recorded) AS first_time,    -- false: a redelivery, nothing to do
       j.job_status,
       j.started_by,    -- the broker user that took the job (NULL: none known)
       b.id            AS build_id,
       b.workspace_id,
       b.transition,
       b.stage,
       b.build_number,
       w.owner_id,
       -- the preset the workspace belongs to (delete builds carry none themselves)
       (SELECT pb.template_version_preset_id FROM workspace_builds pb
        WHERE pb.workspace_id = b.workspace_id
          AND pb.template_version_preset_id IS NOT NULL
        ORDER BY pb.build_number DESC LIMIT 1) AS preset_id
FROM provisioner_jobs j
LEFT JOIN workspace_builds b ON b.job_id = j.id
LEFT JOIN workspaces w ON w.id = b.workspace_id
WHERE j.id = $1
-- NO KEY UPDATE: serializes the job's state events, yet lets log lines (whose foreign-key check
-- takes KEY SHARE on this row) append meanwhile.
FOR NO KEY UPDATE OF j
