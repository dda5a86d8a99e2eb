-- Presets a reconcile pass must look at: the rule is the view presets_needing_attention
-- (schemas/migrations/V12__preset_rules.sql), shared with the CLI's and the API's per-template
-- reconcile requests.
SELECT DISTINCT preset_id FROM presets_needing_attention
