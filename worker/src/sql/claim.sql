-- The claim: one guarded statement picks an eligible prebuild of the preset, skipping rows another
-- claim (or a delete) holds, and transfers it to the user. Eligible = a live prebuild of the
-- template (partial index `workspaces_prebuild_pool`), created for this preset, no delete queued,
-- latest build a successful start on the preset's (= active) version, every agent ready, not
-- expired. PostgreSQL re-checks the workspace row's own predicates after locking it, so a delete
-- committed meanwhile (deleting_at set) or a concurrent claim (owner changed) never wins it too.
-- The scan starts at workspace id $9 and walks up the index: concurrent claims start at random ids
-- and so rarely meet the rows another claim just locked (the caller then covers the ids below the
-- start: $9 the lowest id, $10 the first pass's start; NULL = no upper bound).
-- $1 preset, $2 user, $3 name, $4 now, $5 template, $6 version, $7 last_invalidated_at, $8 TTL secs,
-- $9 first workspace id to consider, $10 first id not to consider (NULL: none).
WITH picked AS (
    SELECT w.id, lb.build_number
    FROM workspaces w
    JOIN workspace_builds first
      ON first.workspace_id = w.id AND first.build_number = 1
     AND first.template_version_preset_id = $1              -- created for this preset
    JOIN LATERAL (
        SELECT b.build_number, b.transition, b.template_version_id, b.job_id
        FROM workspace_builds b WHERE b.workspace_id = w.id
        ORDER BY b.build_number DESC LIMIT 1                 -- the latest build
    ) lb ON true
    JOIN provisioner_jobs j ON j.id = lb.job_id
    WHERE w.template_id = $5
      AND w.id >= $9
      AND ($10::uuid IS NULL OR w.id < $10)
      AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still a prebuild
      AND NOT w.deleted
      AND w.deleting_at IS NULL                              -- no delete queued
      AND lb.transition = 'start' AND j.job_status = 'succeeded'
      AND lb.template_version_id = $6                        -- on the preset's active version
      AND (SELECT bool_and(a.lifecycle_state = 'ready')      -- every agent ready (NULL: none)
           FROM workspace_agents a WHERE a.job_id = lb.job_id AND NOT a.deleted) IS TRUE
      AND ($7::timestamptz IS NULL OR w.created_at >= $7)    -- not invalidated
      AND ($8::int <= 0                                      -- not past its TTL
           OR $4::timestamptz - w.created_at <= make_interval(secs => $8))
    ORDER BY w.id
    LIMIT 1
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE workspaces w
SET owner_id = $2, name = $3, updated_at = $4, last_used_at = $4
FROM picked
WHERE w.id = picked.id
RETURNING w.id, picked.build_number
