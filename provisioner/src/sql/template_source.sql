-- The Terraform source text of one template version (read-only). No row: the version does not
-- exist; a NULL source: the version was pushed without one.
SELECT source
FROM template_versions
-- $1: the job's template_version_id
WHERE id = $1
