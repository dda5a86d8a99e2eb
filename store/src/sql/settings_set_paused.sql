-- Sets the global reconciliation pause to $1; changes no row when it already is.
UPDATE prebuilds_settings SET reconciliation_paused = $1, updated_at = now()
WHERE reconciliation_paused IS DISTINCT FROM $1
