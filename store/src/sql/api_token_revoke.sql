-- Revokes the live token named $1 (nothing when it is already revoked).
UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
