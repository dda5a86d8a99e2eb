-- `GET /api/v1/templates`: live templates with their active version, pause and deprecation.
-- $1 organization name (NULL: every organization).
SELECT t.id, o.name AS organization, t.name, v.name AS active_version,
       t.active_version_id, t.paused, t.deprecated, t.created_at
FROM templates t
JOIN organizations o ON o.id = t.organization_id
LEFT JOIN template_versions v ON v.id = t.active_version_id
WHERE NOT t.deleted                               -- live templates only
  AND ($1::text IS NULL OR o.name = $1)           -- ?organization=
ORDER BY o.name, t.name
