-- Takes the presets that waited longest for capacity off the wait list and returns them, so the
-- caller re-queues their reconciles (a preset held back again re-enters at the back: round-robin).
-- Rows being changed by a concurrent reconcile are skipped, never waited for. $1 = how many.
DELETE FROM preset_capacity_waits
WHERE preset_id IN (
    SELECT preset_id FROM preset_capacity_waits
    ORDER BY waiting_since                               -- oldest wait first
    LIMIT $1
    FOR UPDATE SKIP LOCKED)                              -- not rows a reconcile is updating
RETURNING preset_id
