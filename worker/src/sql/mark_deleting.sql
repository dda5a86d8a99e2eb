-- Lock a prebuild for deletion and mark it, in one statement. Returns nothing when it is no longer
-- a live, unclaimed prebuild: if a claim holds the row, this waits for it and PostgreSQL re-checks
-- the predicates on the committed row, so a claimed workspace is never deleted. $1 workspace, $2 now.
WITH marked AS (
    UPDATE workspaces w
    SET deleting_at = $2, updated_at = $2
    WHERE w.id = $1
      AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still owned by the prebuilds user
      AND NOT w.deleted                                       -- not already gone
      AND w.deleting_at IS NULL                               -- no delete queued yet
    RETURNING w.id, w.name, w.template_id
)
SELECT m.id, m.name, m.template_id, lb.template_version_id, lb.build_number
FROM marked m
JOIN LATERAL (
    SELECT b.template_version_id, b.build_number
    FROM workspace_builds b
    WHERE b.workspace_id = m.id
    ORDER BY b.build_number DESC LIMIT 1                     -- the previous (latest) build
) lb ON true
