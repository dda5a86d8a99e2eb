-- A successful delete build ends the workspace. $1 workspace.
UPDATE workspaces SET deleted = true, updated_at = now() WHERE id = $1
