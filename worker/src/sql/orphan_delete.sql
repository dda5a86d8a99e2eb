-- Orphan-delete a prebuild whose create was canceled before any provisioning: nothing to destroy,
-- so the workspace is deleted at once. $1 workspace, $2 now.
UPDATE workspaces
SET deleted = true, deleting_at = $2, updated_at = $2
WHERE id = $1
  AND owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'   -- ownership guard, as for any delete
  AND NOT deleted
