-- A new API token (only its secret's hash is stored). $1 id, $2 name, $3 role, $4 hash.
INSERT INTO api_tokens (id, name, role, secret_hash) VALUES ($1, $2, $3, $4)
RETURNING id, name, role, created_at, revoked_at
