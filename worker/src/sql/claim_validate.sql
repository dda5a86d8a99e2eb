-- Everything a claim must check and carry before touching a prebuild, in one round trip.
-- $1 user, $2 preset, $3 requested name. Returns one row; NULLs mean "not found".
SELECT u.username                                                          AS username,
       p.id                                                                AS preset_id,
       p.name                                                              AS preset_name,
       p.last_invalidated_at,
       COALESCE(p.invalidate_after_secs, 0)                                AS ttl_secs,
       v.id                                                                AS version_id,
       t.id                                                                AS template_id,
       t.name                                                              AS template_name,
       o.name                                                              AS organization_name,
       -- active = the template's active version, template neither deleted nor deprecated
       (t.active_version_id = v.id AND NOT t.deleted AND t.deprecated = '') AS preset_active,
       -- the user already has a live workspace of that name (names are case-insensitive)
       EXISTS (SELECT 1 FROM workspaces w
               WHERE w.owner_id = $1 AND lower(w.name) = lower($3) AND NOT w.deleted) AS name_taken,
       -- the preset's parameter values, for the claim build
       (SELECT COALESCE(json_agg(json_build_object('name', pp.name, 'value', pp.value) ORDER BY pp.name), '[]')
        FROM template_version_preset_parameters pp
        WHERE pp.template_version_preset_id = p.id)                        AS preset_parameters
FROM (SELECT 1) one
LEFT JOIN users u ON u.id = $1
LEFT JOIN template_version_presets p ON p.id = $2
LEFT JOIN template_versions v ON v.id = p.template_version_id
LEFT JOIN templates t ON t.id = v.template_id
LEFT JOIN organizations o ON o.id = t.organization_id
