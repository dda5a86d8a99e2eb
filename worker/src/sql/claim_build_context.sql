-- Names around a claim build, for resource-replacement logs, metrics and notifications.
-- The preset is the prebuild's original one: that of build #1. $1 job id.
SELECT w.name          AS workspace,
       u.username      AS claimant,
       o.name          AS organization,
       t.name          AS template,
       v.name          AS template_version,
       p.name          AS preset,
       b.build_number
FROM workspace_builds b
JOIN workspaces w ON w.id = b.workspace_id
JOIN users u ON u.id = w.owner_id                          -- the claimant owns it now
JOIN templates t ON t.id = w.template_id
JOIN organizations o ON o.id = t.organization_id
JOIN template_versions v ON v.id = b.template_version_id   -- the claim build's version
JOIN workspace_builds first ON first.workspace_id = w.id AND first.build_number = 1
JOIN template_version_presets p ON p.id = first.template_version_preset_id
WHERE b.job_id = $1
