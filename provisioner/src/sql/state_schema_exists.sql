-- Whether the terraform state schema $1 and its states table exist, and who asks.
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
       to_regclass($1 || '.states') IS NOT NULL,
       current_user::text
