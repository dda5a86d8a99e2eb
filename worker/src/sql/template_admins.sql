-- Who is told about a resource replaced on claim: every template admin.
SELECT id FROM users WHERE 'template-admin' = ANY(rbac_roles) ORDER BY id
