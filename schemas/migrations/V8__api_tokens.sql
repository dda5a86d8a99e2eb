-- prebuilds: bearer tokens of the HTTP API (`prebuilds-api`), made with `prebuildsctl token create`.
--
-- Online-safe: a new, empty table. The secret itself is never stored: only its SHA-256 (the
-- secret has 256 bits of randomness, so a fast hash is enough — there is nothing to brute-force).
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    -- Chosen by the operator; recorded as the actor of every change the token makes.
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    -- What the token may do: admin (everything), claimer (claims and reads), viewer (reads).
    role        text NOT NULL CHECK (role IN ('admin', 'claimer', 'viewer')),
    -- SHA-256 of the secret; the API looks tokens up by it.
    secret_hash bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Set by `prebuildsctl token revoke`: the token is refused from then on. Kept, not deleted, so
    -- the audit log's actor names stay explainable and a name is never silently reused.
    revoked_at  timestamptz
);
