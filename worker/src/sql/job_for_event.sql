-- The job an event is about, locked so events of one job apply one at a time, with its build and
-- workspace. $1 job id.
SELECT j.job_status,
       b.id            AS build_id,
       b.workspace_id,
       b.transition,
       b.stage,
       b.build_number,
       w.owner_id,
       -- the preset the workspace belongs to (delete builds carry none themselves)
       (SELECT pb.template_version_preset_id FROM workspace_builds pb
        WHERE pb.workspace_id = b.workspace_id
          AND pb.template_version_preset_id IS NOT NULL
        ORDER BY pb.build_number DESC LIMIT 1) AS preset_id
FROM provisioner_jobs j
LEFT JOIN workspace_builds b ON b.job_id = j.id
LEFT JOIN workspaces w ON w.id = b.workspace_id
WHERE j.id = $1
FOR UPDATE OF j
