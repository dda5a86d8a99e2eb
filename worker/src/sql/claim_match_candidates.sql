-- What a claim naming template $1 instead of a preset can match: the template's active presets
-- (view preset_activity: its active version, the template neither deleted nor deprecated) with
-- their parameter values (kind 'preset': one row per value, or one row with a NULL name for a
-- preset that sets none), and the defaults of the active version's parameters (kind 'default'),
-- which a request that leaves a parameter out takes before matching. `is_default`: the preset a
-- request without parameters gets.
SELECT 'preset' AS kind, p.id, p.name AS preset_name, pp.name, pp.value, p.is_default
FROM preset_activity a
JOIN template_version_presets p ON p.id = a.preset_id
LEFT JOIN template_version_preset_parameters pp ON pp.template_version_preset_id = p.id
WHERE a.template_id = $1
  AND a.active                                                                  -- active presets only
UNION ALL
SELECT 'default', NULL, NULL, tp.name, tp.default_value, false
FROM templates t
JOIN template_version_parameters tp ON tp.template_version_id = t.active_version_id
WHERE t.id = $1
  AND NOT t.deleted
  AND tp.default_value IS NOT NULL                                              -- declared defaults only
