-- In-flight prebuild create jobs (globally and of one preset) and the other presets held back for
-- capacity: the inputs of the fair share (core `capacity`). Read under the global capacity lock, so
-- every create committed by an earlier holder is counted. Driven by the partial index of open jobs.
-- $1 = the preset asking.
SELECT count(*)                                                        AS inflight,
       count(*) FILTER (WHERE b.template_version_preset_id = $1)      AS preset_inflight,
       (SELECT count(*) FROM preset_capacity_waits w
        WHERE w.preset_id <> $1)                                       AS others_waiting  -- other presets only
FROM provisioner_jobs j
JOIN workspace_builds b ON b.job_id = j.id
WHERE j.job_status IN ('pending', 'running')                           -- open jobs
  AND j.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'          -- initiated by the prebuilds user
  AND b.stage = 'create'                                               -- of prebuild create builds
