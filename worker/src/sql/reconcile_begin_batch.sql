-- Start of a batched reconcile transaction: try each preset's advisory lock without waiting (a
-- batch holding several locks must never wait for another, or two batches could deadlock), read
-- each coalescing watermark and the database clock. A preset whose lock is busy is reconciled on
-- its own afterwards. $1 lock keys, $2 presets (same order); `position` is 1-based into them.
SELECT b.position,
       pg_try_advisory_xact_lock(b.lock_key) AS locked,
       s.last_reconciled_at                  AS watermark,
       clock_timestamp()                     AS now
FROM unnest($1::bigint[], $2::uuid[]) WITH ORDINALITY AS b(lock_key, preset_id, position)
LEFT JOIN preset_reconcile_state s ON s.preset_id = b.preset_id
ORDER BY b.position
