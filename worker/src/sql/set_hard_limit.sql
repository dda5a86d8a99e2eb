-- The preset's hard-limit record, written (or cleared: all NULL) together. $1 preset,
-- $2 since, $3 next probe, $4 cooldown (seconds).
UPDATE template_version_presets
SET hard_limited_at = $2, hard_limit_probe_at = $3, hard_limit_cooldown_secs = $4
WHERE id = $1
