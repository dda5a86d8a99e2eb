-- The 90th percentile of each preset's recent create durations, in milliseconds: how long a new
-- prebuild takes from its job being queued to the job succeeding (the lead time of the built-in
-- autoscaling policy). $1 = preset ids. Uses workspace_builds (template_version_preset_id,
-- created_at DESC).
SELECT p.id AS preset_id, recent.p90_ms
FROM unnest($1::uuid[]) AS p(id)
CROSS JOIN LATERAL (
    SELECT (percentile_cont(0.9) WITHIN GROUP (ORDER BY ms))::float8 AS p90_ms
    FROM (
        SELECT extract(epoch FROM j.completed_at - j.created_at) * 1000 AS ms
        FROM workspace_builds b
        JOIN provisioner_jobs j ON j.id = b.job_id
        WHERE b.template_version_preset_id = p.id
          AND b.build_number = 1                                          -- creates only
          AND b.transition = 'start'
          AND b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'     -- by the reconciler
          AND j.job_status = 'succeeded'                                  -- that finished
          AND j.completed_at IS NOT NULL
        ORDER BY b.created_at DESC
        LIMIT 20                                                          -- recent ones
    ) durations
) recent
WHERE recent.p90_ms IS NOT NULL                                           -- some were measured
