-- The resources a plan would replace, recorded once per job (the first plan result wins; a
-- duplicate changes nothing). $1 job, $2 the replacements (JSON).
UPDATE provisioner_jobs SET resource_replacements = $2, updated_at = now()
WHERE id = $1 AND resource_replacements IS NULL
