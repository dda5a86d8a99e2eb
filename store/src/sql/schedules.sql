-- Prebuild schedules of the given presets, in evaluation order (first match wins).
SELECT preset_id, cron_expression, desired_instances
FROM template_version_preset_prebuild_schedules
WHERE preset_id = ANY($1)                                -- only the presets asked for
ORDER BY preset_id, position, id
