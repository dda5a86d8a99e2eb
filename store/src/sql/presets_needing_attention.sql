-- Presets a reconcile pass must look at (docs/architecture.md, the scheduler): presets with prebuilds configured
-- on active versions, plus any preset that still has live prebuilds (running, pending, failed —
-- the worker decides what to do; inactive presets with nothing live are skipped).
SELECT p.id AS preset_id
FROM template_version_presets p
JOIN template_versions v ON v.id = p.template_version_id
JOIN templates t ON t.id = v.template_id
WHERE p.desired_instances IS NOT NULL                     -- prebuilds configured (0 counts)
  AND t.active_version_id = v.id                          -- on the template's active version
  AND NOT t.deleted                                       -- of a live template
  AND t.deprecated = ''                                   -- that is not deprecated
UNION
SELECT wb.template_version_preset_id
FROM workspaces w
JOIN workspace_builds wb ON wb.workspace_id = w.id
WHERE w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- live prebuilds...
  AND NOT w.deleted
  AND wb.template_version_preset_id IS NOT NULL           -- ...and the presets their builds belong to
