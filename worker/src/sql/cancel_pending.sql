-- Cancel the still-pending build-#1 start jobs of an (inactive) preset. Only jobs no provisioner has
-- started are touched, so this never races a build in progress. $1 preset, $2 now.
UPDATE provisioner_jobs j
SET job_status = 'canceled', canceled_at = $2, completed_at = $2, updated_at = $2
FROM workspace_builds b
JOIN workspaces w ON w.id = b.workspace_id
WHERE b.job_id = j.id
  AND b.template_version_preset_id = $1                   -- this preset's builds
  AND b.build_number = 1                                  -- the create build
  AND b.transition = 'start'
  AND b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- made by the reconciler
  AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still a prebuild
  AND NOT w.deleted
  AND j.job_status = 'pending'                            -- truly pending:
  AND j.started_at IS NULL                                --   no provisioner picked it up
  AND j.canceled_at IS NULL
  AND j.completed_at IS NULL
RETURNING j.id AS job_id, b.workspace_id, b.template_version_id
