-- Presets of a template's active version with their parameters, for matching a claim that names
-- a template and parameters instead of a preset. $1 template.
SELECT p.id, pp.name, pp.value
FROM templates t
JOIN template_version_presets p ON p.template_version_id = t.active_version_id  -- active version only
LEFT JOIN template_version_preset_parameters pp ON pp.template_version_preset_id = p.id
WHERE t.id = $1
  AND NOT t.deleted
