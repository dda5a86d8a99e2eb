-- prebuilds: self-healing, capacity-aware pools (issue 12).
--
-- 1. Hard-limit recovery: the circuit breaker of a hard-limited preset (see core `recovery`).
--    Kept on the preset row next to `prebuild_status`, written in the same reconcile statement.
ALTER TABLE template_version_presets
    -- When the preset last became hard_limited (NULL = not limited).
    ADD COLUMN hard_limited_at          timestamptz,
    -- When the next probe create may run.
    ADD COLUMN hard_limit_probe_at      timestamptz,
    -- The current cooldown in seconds (doubles after each failed probe, up to the maximum).
    ADD COLUMN hard_limit_cooldown_secs bigint,
    -- `prebuildsctl preset reset`: start builds created before this no longer count toward backoff
    -- or the hard limit.
    ADD COLUMN failures_reset_at        timestamptz;

-- 2. Capacity-aware refill: presets whose creates were held back by the in-flight cap. A completed
--    prebuild create build re-queues the oldest few (round-robin); a reconcile that can create
--    everything it wants removes its row.
CREATE TABLE preset_capacity_waits (
    preset_id     uuid PRIMARY KEY REFERENCES template_version_presets (id) ON DELETE CASCADE,
    waiting_since timestamptz NOT NULL
);
CREATE INDEX preset_capacity_waits_since ON preset_capacity_waits (waiting_since);
