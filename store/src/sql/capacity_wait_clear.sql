-- Preset $1 got everything it asked for: off the wait list.
DELETE FROM preset_capacity_waits WHERE preset_id = $1
