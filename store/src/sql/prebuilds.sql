-- Every live prebuild of the given presets with its latest build: the one read from which the
-- snapshot derives running prebuilds, in-progress counts, pending build-#1 jobs and the failure
-- history. Driven from the partial index of live prebuilds per template, so its cost follows pool
-- sizes, not history. $1 = preset ids.
SELECT cp.preset_id,
       w.id                 AS workspace_id,
       w.created_at         AS workspace_created_at,
       lb.build_number,
       lb.transition,
       lb.initiator_id,
       lb.created_at        AS build_created_at,
       j.job_status,
       j.started_at         AS job_started_at,
       -- ready = every non-deleted agent of the latest build is ready; false when it has none
       COALESCE((SELECT bool_and(a.lifecycle_state = 'ready')
                 FROM workspace_agents a
                 WHERE a.job_id = lb.job_id
                   AND NOT a.deleted), false) AS ready
FROM (SELECT DISTINCT v.template_id                       -- templates of the presets asked for
      FROM template_version_presets p
      JOIN template_versions v ON v.id = p.template_version_id
      WHERE p.id = ANY($1)) t
-- Per template, so the template filter applies at the scan of workspaces whatever plan PostgreSQL
-- picks (even a generic plan made while the tables were nearly empty): the per-row lookups below
-- only ever run for the pools asked for, never for every live prebuild. OFFSET 0 keeps the planner
-- from flattening the subquery and moving that filter after the lookups (seen: 12 s per read
-- during a cold fill).
JOIN LATERAL (
    SELECT w.id, w.created_at FROM workspaces w
    WHERE w.template_id = t.template_id
      AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still a prebuild (a claimed one is the user's)
      AND NOT w.deleted                                      -- live workspaces only
    OFFSET 0
) w ON true
JOIN LATERAL (
    SELECT b.build_number, b.transition, b.initiator_id, b.created_at, b.job_id,
           b.template_version_preset_id
    FROM workspace_builds b
    WHERE b.workspace_id = w.id
    ORDER BY b.build_number DESC LIMIT 1                 -- the latest build
) lb ON true
JOIN provisioner_jobs j ON j.id = lb.job_id
-- The workspace's current preset: the latest build's, or for a delete build (which carries none)
-- that of the latest build that has one. COALESCE looks that up only for delete builds.
CROSS JOIN LATERAL (
    SELECT COALESCE(lb.template_version_preset_id,
                    (SELECT b.template_version_preset_id FROM workspace_builds b
                     WHERE b.workspace_id = w.id
                       AND b.template_version_preset_id IS NOT NULL
                     ORDER BY b.build_number DESC LIMIT 1)) AS preset_id
) cp
WHERE cp.preset_id = ANY($1)                             -- it belongs to one of these presets now
