-- Whether a token named $1 exists (revoked or not).
SELECT 1 FROM api_tokens WHERE name = $1
