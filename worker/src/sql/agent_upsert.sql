-- Create or advance an agent of a job whose build succeeded (prebuilds_core::admit: agents of
-- unfinished builds wait, those of failed or canceled ones are refused). Lifecycle only moves
-- forward (agent_lifecycle_rank), so a reordered `starting` after `ready` changes nothing; a
-- lifecycle event that overtakes the completion's agent list creates the row.
-- $1 id (for a new row), $2 job, $3 name, $4 state.
INSERT INTO workspace_agents (id, job_id, name, lifecycle_state)
VALUES ($1, $2, $3, $4)
ON CONFLICT (job_id, name) DO UPDATE
SET lifecycle_state = EXCLUDED.lifecycle_state
WHERE agent_lifecycle_rank(EXCLUDED.lifecycle_state) > agent_lifecycle_rank(workspace_agents.lifecycle_state)
