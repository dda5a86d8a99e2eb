-- The preset's stored prebuild status. $1 preset, $2 status.
UPDATE template_version_presets SET prebuild_status = $2 WHERE id = $1
