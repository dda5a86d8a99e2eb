-- Lifetime prebuild counters by (template, preset, organization) name, as Coder's
-- GetPrebuildMetrics: every workspace whose build #1 was a prebuild creation, whether or not it
-- still exists. Deleted templates are excluded (their series disappear, and a deleted and a live
-- template sharing a name cannot produce two series with one label set).
SELECT t.name                                             AS template_name,
       p.name                                             AS preset_name,
       o.name                                             AS organization_name,
       count(*)                                           AS created_count,
       count(*) FILTER (WHERE j.job_status = 'failed')    AS failed_count,   -- build #1 failed
       count(*) FILTER (
           WHERE w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0'      -- no longer the prebuilds
       )                                                  AS claimed_count   -- user's: claimed
FROM workspace_builds b
JOIN workspaces w ON w.id = b.workspace_id                -- deleted workspaces count too (lifetime)
JOIN provisioner_jobs j ON j.id = b.job_id
JOIN template_version_presets p ON p.id = b.template_version_preset_id
JOIN templates t ON t.id = w.template_id
JOIN organizations o ON o.id = w.organization_id
WHERE b.build_number = 1                                   -- the creating build
  AND b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- initiated by the prebuilds user
  AND b.template_version_preset_id IS NOT NULL             -- with a preset
  AND NOT t.deleted                                        -- live templates only
GROUP BY t.name, p.name, o.name
