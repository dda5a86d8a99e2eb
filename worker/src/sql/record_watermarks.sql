-- Record, per preset, the database clock read before its snapshot: every reconcile job requested
-- well before it is answered by that snapshot (see COALESCE_MARGIN). $1 presets, $2 clocks.
INSERT INTO preset_reconcile_state (preset_id, last_reconciled_at)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[])
ON CONFLICT (preset_id) DO UPDATE SET last_reconciled_at = EXCLUDED.last_reconciled_at
