-- The parameters of a workspace's latest build that was not a delete: the variables a delete
-- build (which carries no parameters) destroys with. Read-only. No row: the workspace had no
-- such build. $1: the workspace id.
SELECT parameters::text
FROM workspace_builds
WHERE workspace_id = $1
  AND transition <> 'delete'
ORDER BY build_number DESC
LIMIT 1
