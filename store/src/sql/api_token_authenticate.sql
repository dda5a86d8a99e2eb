-- The live token whose secret hashes to $1.
SELECT name, role FROM api_tokens
WHERE secret_hash = $1
  AND revoked_at IS NULL   -- a revoked token is refused
