-- The claim: one guarded statement picks an eligible prebuild of the preset, skipping rows another
-- claim (or a delete) holds, and transfers it to the user. Eligible = live, unclaimed, no delete
-- queued, latest build a successful start on the template's active version, every agent ready,
-- not expired, template not deleted. PostgreSQL re-checks the workspace row's own predicates after
-- locking, so a delete committed meanwhile (deleting_at set) is never claimed.
-- $1 preset, $2 user, $3 name, $4 now.
WITH picked AS (
    SELECT w.id, lb.build_number
    FROM workspace_builds pb                                 -- drive from this preset's builds (indexed)
    JOIN workspaces w ON w.id = pb.workspace_id
    JOIN templates t ON t.id = w.template_id
    JOIN template_version_presets p ON p.id = pb.template_version_preset_id
    JOIN LATERAL (
        SELECT b.build_number, b.transition, b.template_version_id, b.job_id
        FROM workspace_builds b WHERE b.workspace_id = w.id
        ORDER BY b.build_number DESC LIMIT 1                 -- the latest build
    ) lb ON true
    JOIN provisioner_jobs j ON j.id = lb.job_id
    WHERE pb.template_version_preset_id = $1
      AND pb.build_number = 1                                -- the prebuild's create build
      AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still a prebuild
      AND NOT w.deleted
      AND w.deleting_at IS NULL                              -- no delete queued
      AND lb.transition = 'start' AND j.job_status = 'succeeded'
      AND lb.template_version_id = t.active_version_id       -- on the active version
      AND NOT t.deleted
      AND EXISTS (SELECT 1 FROM workspace_agents a WHERE a.job_id = lb.job_id AND NOT a.deleted)
      AND NOT EXISTS (SELECT 1 FROM workspace_agents a       -- every agent ready
                      WHERE a.job_id = lb.job_id AND NOT a.deleted AND a.lifecycle_state <> 'ready')
      AND (p.last_invalidated_at IS NULL OR w.created_at >= p.last_invalidated_at)  -- not invalidated
      AND (COALESCE(p.invalidate_after_secs, 0) <= 0                                 -- not past its TTL
           OR $4 - w.created_at <= make_interval(secs => p.invalidate_after_secs))
    LIMIT 1
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE workspaces w
SET owner_id = $2, name = $3, updated_at = $4, last_used_at = $4
FROM picked
WHERE w.id = picked.id
RETURNING w.id, w.template_id, picked.build_number
