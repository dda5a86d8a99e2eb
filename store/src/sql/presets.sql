-- Presets by id, with everything the core needs to decide whether they are active and paused,
-- and the names operators and metrics use. $1 = preset ids.
SELECT p.id                                   AS preset_id,
       p.name                                 AS preset_name,
       p.desired_instances,
       p.invalidate_after_secs,
       p.scheduling_timezone,
       p.prebuild_status,
       p.last_invalidated_at,
       p.hard_limited_at,
       p.hard_limit_probe_at,
       p.hard_limit_cooldown_secs,
       p.failures_reset_at,
       p.autoscaling_min,                                -- NULL = no autoscaling
       p.autoscaling_max,
       p.autoscaling_expression,
       v.id                                   AS template_version_id,
       v.name                                 AS template_version_name,
       t.id                                   AS template_id,
       t.name                                 AS template_name,
       o.id                                   AS organization_id,
       o.name                                 AS organization_name,
       a.version_is_active,                              -- the parts of "active" (view preset_activity)
       a.template_deleted,
       a.template_deprecated,
       p.paused                               AS preset_paused,
       t.paused                               AS template_paused,
       COALESCE(s.reconciliation_paused, false) AS global_paused
FROM template_version_presets p
JOIN template_versions v ON v.id = p.template_version_id
JOIN templates t ON t.id = v.template_id
JOIN organizations o ON o.id = t.organization_id
JOIN preset_activity a ON a.preset_id = p.id
LEFT JOIN prebuilds_settings s ON true                  -- the single settings row
WHERE p.id = ANY($1)
