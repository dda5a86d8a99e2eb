-- Create or advance an agent of a job. Lifecycle only moves forward (agent_lifecycle_rank), so a
-- reordered `starting` after `ready` changes nothing; an agent event that overtakes job_completed
-- creates the row. A job that ended without a build (failed — the job reaper's included — or
-- canceled) gets no agents: a late event of a reaped job changes nothing.
-- $1 id (for a new row), $2 job, $3 name, $4 state.
INSERT INTO workspace_agents (id, job_id, name, lifecycle_state)
SELECT $1, $2, $3, $4
WHERE NOT EXISTS (
    SELECT 1 FROM provisioner_jobs WHERE id = $2 AND job_status IN ('failed', 'canceled')
)
ON CONFLICT (job_id, name) DO UPDATE
SET lifecycle_state = EXCLUDED.lifecycle_state
WHERE agent_lifecycle_rank(EXCLUDED.lifecycle_state) > agent_lifecycle_rank(workspace_agents.lifecycle_state)
