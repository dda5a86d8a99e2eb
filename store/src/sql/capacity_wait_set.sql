-- Preset $1 waits for in-flight capacity (keeps its place when it already waits).
INSERT INTO preset_capacity_waits (preset_id, waiting_since) VALUES ($1, clock_timestamp())
ON CONFLICT (preset_id) DO NOTHING
