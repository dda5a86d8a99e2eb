-- Presets whose pool state the scheduler exports (docs/metrics.md, Coder's metrics collector): every
-- preset with prebuilds configured on a template that is not deleted. Whether a preset is on its
-- template's active version is decided afterwards from its snapshot (the gauges only show active
-- presets); presets of deleted templates are left out entirely, so their series disappear.
SELECT p.id
FROM template_version_presets p
JOIN template_versions v ON v.id = p.template_version_id
JOIN templates t ON t.id = v.template_id
WHERE p.desired_instances IS NOT NULL   -- prebuilds configured (0 counts)
  AND NOT t.deleted                     -- live templates only
