-- prebuilds: pools that follow demand, and the default preset.
--
-- Online-safe: columns added without a default (or with a constant one) rewrite no row; the
-- partial unique index starts with no entry (no preset is a default before this migration).

-- A preset's `prebuilds.autoscaling` block: the pool is sized within [min, max] from demand, by
-- the built-in policy (expression NULL) or by the sizing expression (validated at push). Both
-- bounds NULL = no autoscaling: the base count and schedules alone decide.
ALTER TABLE template_version_presets
    ADD COLUMN autoscaling_min        integer,
    ADD COLUMN autoscaling_max        integer,
    ADD COLUMN autoscaling_expression text,
    ADD CONSTRAINT template_version_presets_autoscaling_bounds CHECK (
        (autoscaling_min IS NULL AND autoscaling_max IS NULL AND autoscaling_expression IS NULL)
        OR (autoscaling_min >= 0 AND autoscaling_max >= autoscaling_min)
    );

-- The preset a claim naming only the template (no parameters) gets.
ALTER TABLE template_version_presets ADD COLUMN is_default boolean NOT NULL DEFAULT false;
-- At most one default per template version, whatever writes the rows.
CREATE UNIQUE INDEX template_version_presets_one_default
    ON template_version_presets (template_version_id) WHERE is_default;
