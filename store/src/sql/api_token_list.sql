-- Every API token, oldest first.
SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at, name
