-- A workspace build. $1 id, $2 workspace, $3 version, $4 number, $5 transition, $6 initiator,
-- $7 job, $8 preset (NULL for delete builds), $9 stage, $10 orphan, $11 parameters, $12 now.
INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition,
                              initiator_id, job_id, template_version_preset_id, stage, orphan,
                              parameters, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
