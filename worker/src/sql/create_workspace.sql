-- A new prebuild workspace, owned by the prebuilds user. $1 id, $2 organization, $3 template,
-- $4 name, $5 now.
INSERT INTO workspaces (id, owner_id, organization_id, template_id, name, created_at, updated_at, last_used_at)
VALUES ($1, 'c42fdf75-3097-471c-8c33-fb52454d81c0', $2, $3, $4, $5, $5, $5)
