-- The template parameters of a version and the values a preset sets, for create-time validation.
-- $1 version, $2 preset. kind = 'template' rows carry required/default; 'preset' rows carry value.
SELECT 'template' AS kind, name, required, default_value, NULL::text AS value
FROM template_version_parameters
WHERE template_version_id = $1
UNION ALL
SELECT 'preset', name, NULL, NULL, value
FROM template_version_preset_parameters
WHERE template_version_preset_id = $2
