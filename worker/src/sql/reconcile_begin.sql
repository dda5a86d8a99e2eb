-- Start of a single-preset reconcile transaction: wait for the preset's advisory lock, then read the
-- coalescing watermark and the database clock. Same parameters and columns as
-- reconcile_begin_batch.sql, with exactly one preset: $1 lock keys, $2 presets.
SELECT 1::bigint                                                                        AS position,
       true                                                                             AS locked,
       (SELECT last_reconciled_at FROM preset_reconcile_state WHERE preset_id = ($2::uuid[])[1]) AS watermark,
       clock_timestamp()                                                                AS now
FROM (SELECT pg_advisory_xact_lock(($1::bigint[])[1])) AS lock
