-- Start of a reconcile transaction: wait for the preset's advisory lock, then read the coalescing
-- watermark and the database clock. $1 lock key, $2 preset.
SELECT pg_advisory_xact_lock($1)                                                     AS locked,
       (SELECT last_reconciled_at FROM preset_reconcile_state WHERE preset_id = $2) AS watermark,
       clock_timestamp()                                                             AS now
