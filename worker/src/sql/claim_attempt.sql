-- A claim attempt in one statement: everything the claim must check and carry, and, only when
-- every check passes, the guarded claim of one eligible prebuild. One statement, so a request
-- that names its preset goes out with BEGIN and the request lock in a single round trip.
--
-- Checks (NULL = not found): the user, and whether it may claim at all (not the prebuilds system
-- user nor any system user, not deleted); the preset, its names and TTL; whether the user is a
-- member of the template's organization; whether the preset is active (view preset_activity:
-- its template's active version; template neither deleted nor deprecated); whether the user
-- already has a live workspace of the requested name (case-insensitive); the reply stored by an earlier delivery of
-- this request, with the user and request it answered. This statement starts after the request
-- lock is granted, so it sees such a reply, and then claims nothing.
--
-- Eligible prebuild: a live prebuild of the template (partial index `workspaces_prebuild_pool`),
-- created for this preset, no delete queued, latest build a successful start on the active
-- version, every agent ready, not invalidated, not past its TTL. `FOR UPDATE SKIP LOCKED`:
-- concurrent claims never pick the same prebuild and never wait on each other; PostgreSQL
-- re-checks the workspace row's own predicates after locking it, so a delete committed meanwhile
-- (deleting_at set) or a concurrent claim (owner changed) never wins it too. The scan starts at
-- workspace id $5 and walks up the pool index: concurrent claims start at random ids and so
-- rarely meet the rows another claim just locked (the caller then covers the ids below the start).
--
-- $1 user, $2 preset, $3 requested name, $4 request id, $5 first workspace id to consider,
-- $6 first id not to consider (NULL: none).
WITH checks AS (
    SELECT u.username,
           (NOT u.is_system AND NOT u.deleted)                                  AS user_may_claim,
           EXISTS (SELECT 1 FROM organization_members m
                   WHERE m.user_id = $1 AND m.organization_id = t.organization_id) AS member,
           p.id                                                                 AS preset_id,
           p.name                                                               AS preset_name,
           p.last_invalidated_at,
           COALESCE(p.invalidate_after_secs, 0)                                 AS ttl_secs,
           v.id                                                                 AS version_id,
           t.id                                                                 AS template_id,
           t.name                                                               AS template_name,
           o.name                                                               AS organization_name,
           a.active                                                             AS preset_active,
           EXISTS (SELECT 1 FROM workspaces w
                   WHERE w.owner_id = $1 AND lower(w.name) = lower($3) AND NOT w.deleted) AS name_taken,
           (SELECT COALESCE(json_agg(json_build_object('name', pp.name, 'value', pp.value) ORDER BY pp.name), '[]')
            FROM template_version_preset_parameters pp
            WHERE pp.template_version_preset_id = p.id)                         AS preset_parameters,
           r.reply                                                              AS answered_reply,
           r.user_id                                                            AS answered_user_id,
           r.request                                                            AS answered_request,
           clock_timestamp()                                                    AS now
    FROM (SELECT 1) one
    LEFT JOIN users u ON u.id = $1
    LEFT JOIN template_version_presets p ON p.id = $2
    LEFT JOIN template_versions v ON v.id = p.template_version_id
    LEFT JOIN templates t ON t.id = v.template_id
    LEFT JOIN organizations o ON o.id = t.organization_id
    LEFT JOIN preset_activity a ON a.preset_id = p.id
    LEFT JOIN claim_requests r ON r.request_id = $4
),
picked AS (
    SELECT w.id, lb.build_number
    FROM checks c
    -- The template through a scalar subquery, evaluated once before the scan: the scan is then
    -- an index range on the pool, (template, id >= $5), in id order. NULL (a check failed)
    -- matches nothing.
    JOIN workspaces w ON w.template_id = (SELECT template_id FROM checks
                                          WHERE username IS NOT NULL AND user_may_claim
                                            AND member AND preset_active
                                            AND NOT name_taken AND answered_reply IS NULL)
    JOIN workspace_builds first
      ON first.workspace_id = w.id AND first.build_number = 1
     AND first.template_version_preset_id = c.preset_id     -- created for this preset
    JOIN LATERAL (
        SELECT b.build_number, b.transition, b.template_version_id, b.job_id
        FROM workspace_builds b WHERE b.workspace_id = w.id
        ORDER BY b.build_number DESC LIMIT 1                 -- the latest build
    ) lb ON true
    JOIN provisioner_jobs j ON j.id = lb.job_id
    WHERE w.id >= $5
      AND ($6::uuid IS NULL OR w.id < $6)
      AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- still a prebuild
      AND NOT w.deleted
      AND w.deleting_at IS NULL                              -- no delete queued
      AND lb.transition = 'start' AND j.job_status = 'succeeded'
      AND lb.template_version_id = c.version_id              -- on the active version
      AND (SELECT bool_and(a.lifecycle_state = 'ready')      -- every agent ready (NULL: none)
           FROM workspace_agents a WHERE a.job_id = lb.job_id AND NOT a.deleted) IS TRUE
      AND (c.last_invalidated_at IS NULL OR w.created_at >= c.last_invalidated_at)
      AND (c.ttl_secs <= 0 OR c.now - w.created_at <= make_interval(secs => c.ttl_secs))
    ORDER BY w.id
    LIMIT 1
    FOR UPDATE OF w SKIP LOCKED
),
claimed AS (
    UPDATE workspaces w
    SET owner_id = $1, name = $3, updated_at = c.now, last_used_at = c.now
    FROM picked, checks c
    WHERE w.id = picked.id
    RETURNING w.id, picked.build_number
)
SELECT c.*,
       claimed.id           AS claimed_workspace_id,
       claimed.build_number AS claimed_build_number
FROM checks c
LEFT JOIN claimed ON true
