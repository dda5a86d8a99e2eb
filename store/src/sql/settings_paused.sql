-- The global reconciliation pause (the single settings row; none = not paused).
SELECT reconciliation_paused FROM prebuilds_settings
