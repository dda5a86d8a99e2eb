-- prebuilds: one definition of "the preset is active" and of "the preset needs a reconcile", as
-- views every statement that needs them reads, instead of a predicate copied into each.
--
-- preset_activity: a preset is active when it is on its template's active version and the
-- template is neither deleted nor deprecated (a non-empty deprecation message). The three parts
-- are exported too, because the reconciler's core treats them differently (an inactive version
-- is cleaned up; a deleted template's failures are not counted). The core's
-- `PresetInfo::is_active` must agree with `active`: tests/tests/preset_rules.rs pins them.
--
-- presets_needing_attention: presets a reconcile pass must look at — active presets with
-- prebuilds configured (0 counts: a pool scaled to zero is drained), plus every preset a live
-- prebuild was built for (whatever its state: inactive presets only get cleaned up). A preset
-- outside it has nothing to do; the same test checks that the core plans nothing for one.
--
-- Online-safe: new views take no lock on the tables they read. Re-runnable (OR REPLACE), as every
-- migration here is.
SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE VIEW preset_activity AS
SELECT p.id                                            AS preset_id,
       v.id                                            AS template_version_id,
       t.id                                            AS template_id,
       t.active_version_id IS NOT DISTINCT FROM v.id   AS version_is_active,
       t.deleted                                       AS template_deleted,
       t.deprecated <> ''                              AS template_deprecated,
       (t.active_version_id IS NOT DISTINCT FROM v.id
        AND NOT t.deleted AND t.deprecated = '')       AS active
FROM template_version_presets p
JOIN template_versions v ON v.id = p.template_version_id
JOIN templates t ON t.id = v.template_id;

CREATE OR REPLACE VIEW presets_needing_attention AS
SELECT a.preset_id, a.template_id
FROM preset_activity a
JOIN template_version_presets p ON p.id = a.preset_id
WHERE a.active
  AND p.desired_instances IS NOT NULL                     -- prebuilds configured (0 counts)
UNION
SELECT wb.template_version_preset_id, w.template_id
FROM workspaces w
JOIN workspace_builds wb ON wb.workspace_id = w.id
WHERE w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' -- live prebuilds...
  AND NOT w.deleted
  AND wb.template_version_preset_id IS NOT NULL;          -- ...and the presets they were built for
