-- prebuilds: initial schema.
--
-- The tables and columns named in SPEC.md §3 are interfaces (acceptance tests read and write them);
-- everything else here (outbox, processed messages, claim requests, reconcile bookkeeping) is this
-- service's own design. Status-like columns are text with CHECK constraints rather than enum types so
-- that adding a value is a plain constraint swap, not an `ALTER TYPE` that cannot run in a transaction.

CREATE TABLE organizations (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id         uuid PRIMARY KEY,
    username   text NOT NULL UNIQUE,
    email      text NOT NULL DEFAULT '',
    is_system  boolean NOT NULL DEFAULT false,
    rbac_roles text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organization_members (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, organization_id)
);

CREATE TABLE templates (
    id                uuid PRIMARY KEY,
    organization_id   uuid NOT NULL REFERENCES organizations (id),
    name              text NOT NULL,
    -- Set once the first version exists; the FK is added below (templates and versions reference
    -- each other).
    active_version_id uuid,
    deleted           boolean NOT NULL DEFAULT false,
    -- Non-empty = deprecated, and the text is the message shown to users (Coder's convention).
    deprecated        text NOT NULL DEFAULT '',
    -- Template-scoped reconciliation pause (SPEC.md §2 "Pause").
    paused            boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- A deleted template frees its name for a new one in the same organization.
CREATE UNIQUE INDEX templates_org_name_live ON templates (organization_id, name) WHERE NOT deleted;

CREATE TABLE template_versions (
    id          uuid PRIMARY KEY,
    template_id uuid NOT NULL REFERENCES templates (id),
    name        text NOT NULL,
    source      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (template_id, name)
);

ALTER TABLE templates
    ADD CONSTRAINT templates_active_version_fk
    FOREIGN KEY (active_version_id) REFERENCES template_versions (id) DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE template_version_parameters (
    template_version_id uuid NOT NULL REFERENCES template_versions (id) ON DELETE CASCADE,
    name                text NOT NULL,
    required            boolean NOT NULL DEFAULT false,
    default_value       text,
    PRIMARY KEY (template_version_id, name)
);

CREATE TABLE template_version_presets (
    id                    uuid PRIMARY KEY,
    template_version_id   uuid NOT NULL REFERENCES template_versions (id) ON DELETE CASCADE,
    name                  text NOT NULL,
    -- NULL = prebuilds not configured for this preset; 0 is a valid configured value.
    desired_instances     integer CHECK (desired_instances IS NULL OR desired_instances >= 0),
    -- TTL of an unclaimed prebuild in seconds; NULL or <= 0 disables expiry.
    invalidate_after_secs integer DEFAULT 0,
    scheduling_timezone   text NOT NULL DEFAULT '',
    prebuild_status       text NOT NULL DEFAULT 'healthy'
        CHECK (prebuild_status IN ('healthy', 'hard_limited', 'validation_failed')),
    last_invalidated_at   timestamptz,
    paused                boolean NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (template_version_id, name)
);

CREATE TABLE template_version_preset_parameters (
    template_version_preset_id uuid NOT NULL REFERENCES template_version_presets (id) ON DELETE CASCADE,
    name                       text NOT NULL,
    value                      text NOT NULL,
    PRIMARY KEY (template_version_preset_id, name)
);

CREATE TABLE template_version_preset_prebuild_schedules (
    id                uuid PRIMARY KEY,
    preset_id         uuid NOT NULL REFERENCES template_version_presets (id) ON DELETE CASCADE,
    -- Evaluation order: the first schedule whose range contains now wins.
    position          integer NOT NULL DEFAULT 0,
    cron_expression   text NOT NULL,
    desired_instances integer NOT NULL CHECK (desired_instances >= 0)
);
CREATE INDEX template_version_preset_prebuild_schedules_preset
    ON template_version_preset_prebuild_schedules (preset_id, position);

CREATE TABLE workspaces (
    id              uuid PRIMARY KEY,
    owner_id        uuid NOT NULL REFERENCES users (id),
    organization_id uuid NOT NULL REFERENCES organizations (id),
    template_id     uuid NOT NULL REFERENCES templates (id),
    name            text NOT NULL,
    deleted         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz NOT NULL DEFAULT now(),
    -- Set (on the workspace row itself) by the statement that queues a delete build. A claim's
    -- `FOR UPDATE SKIP LOCKED` re-checks the locked row, so it can see this column change even when
    -- its snapshot predates the delete: a claim and a delete can never both win one workspace.
    deleting_at     timestamptz
);
-- Workspace names are unique per owner among live workspaces (Coder compares case-insensitively).
CREATE UNIQUE INDEX workspaces_owner_name_live ON workspaces (owner_id, lower(name)) WHERE NOT deleted;
CREATE INDEX workspaces_template ON workspaces (template_id) WHERE NOT deleted;
-- The live prebuilds of a template: what snapshots and claims scan. Bounded by pool sizes, not by
-- history (claimed and deleted prebuilds leave the index).
CREATE INDEX workspaces_prebuild_pool ON workspaces (template_id)
    WHERE owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' AND NOT deleted;

CREATE TABLE provisioner_jobs (
    id           uuid PRIMARY KEY,
    initiator_id uuid NOT NULL REFERENCES users (id),
    input        jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    completed_at timestamptz,
    canceled_at  timestamptz,
    error        text,
    -- Resources the plan of this build replaces (from a provisioner's plan_result event).
    resource_replacements jsonb,
    job_status   text NOT NULL DEFAULT 'pending'
        CHECK (job_status IN ('pending', 'running', 'succeeded', 'failed', 'canceling', 'canceled'))
);
CREATE INDEX provisioner_jobs_open ON provisioner_jobs (created_at) WHERE job_status IN ('pending', 'running');

CREATE TABLE workspace_builds (
    id                         uuid PRIMARY KEY,
    workspace_id               uuid NOT NULL REFERENCES workspaces (id),
    template_version_id        uuid NOT NULL REFERENCES template_versions (id),
    build_number               integer NOT NULL CHECK (build_number >= 1),
    transition                 text NOT NULL CHECK (transition IN ('start', 'stop', 'delete')),
    initiator_id               uuid NOT NULL REFERENCES users (id),
    job_id                     uuid NOT NULL UNIQUE REFERENCES provisioner_jobs (id),
    template_version_preset_id uuid REFERENCES template_version_presets (id),
    -- Prebuild build stage carried to the provisioner: 'create' (new prebuild), 'claim' (first build
    -- for the claimant), 'none' (everything else).
    stage                      text NOT NULL DEFAULT 'none' CHECK (stage IN ('create', 'claim', 'none')),
    -- Orphan delete: nothing was provisioned, so no destroy runs.
    orphan                     boolean NOT NULL DEFAULT false,
    parameters                 jsonb NOT NULL DEFAULT '[]',
    created_at                 timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, build_number)
);
CREATE INDEX workspace_builds_preset ON workspace_builds (template_version_preset_id, created_at DESC);

CREATE TABLE provisioner_job_logs (
    id         bigserial PRIMARY KEY,
    job_id     uuid NOT NULL REFERENCES provisioner_jobs (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    level      text NOT NULL CHECK (level IN ('trace', 'debug', 'info', 'warn', 'error')),
    stage      text NOT NULL DEFAULT '',
    output     text NOT NULL
);
CREATE INDEX provisioner_job_logs_job ON provisioner_job_logs (job_id, id);

CREATE TABLE workspace_agents (
    id              uuid PRIMARY KEY,
    job_id          uuid NOT NULL REFERENCES provisioner_jobs (id),
    name            text NOT NULL,
    lifecycle_state text NOT NULL DEFAULT 'created'
        CHECK (lifecycle_state IN ('created', 'starting', 'start_timeout', 'start_error', 'ready',
                                   'shutting_down', 'shutdown_timeout', 'shutdown_error', 'off')),
    deleted         boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, name)
);

-- Agent lifecycle states only move forward (created → starting → ready|start_error|start_timeout →
-- shutting_down → off): a delayed, redelivered or reordered event can never move an agent back.
CREATE FUNCTION agent_lifecycle_rank(state text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE state
        WHEN 'created' THEN 0
        WHEN 'starting' THEN 1
        WHEN 'start_timeout' THEN 2
        WHEN 'start_error' THEN 2
        WHEN 'ready' THEN 2
        WHEN 'shutting_down' THEN 3
        WHEN 'shutdown_timeout' THEN 4
        WHEN 'shutdown_error' THEN 4
        WHEN 'off' THEN 5
    END
$$;

CREATE TABLE notification_templates (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    title_template  text NOT NULL,
    body_template   text NOT NULL,
    "group"         text NOT NULL DEFAULT ''
);

CREATE TABLE notification_messages (
    id                       uuid PRIMARY KEY,
    notification_template_id uuid NOT NULL REFERENCES notification_templates (id),
    user_id                  uuid NOT NULL REFERENCES users (id),
    payload                  jsonb NOT NULL,
    -- Makes "exactly once per (build, admin)" a constraint instead of a hope: the worker inserts with
    -- ON CONFLICT DO NOTHING, so a redelivered event cannot notify twice.
    dedupe_key               text NOT NULL UNIQUE,
    created_at               timestamptz NOT NULL DEFAULT now()
);

-- Global settings: exactly one row.
CREATE TABLE prebuilds_settings (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    reconciliation_paused boolean NOT NULL DEFAULT false,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
INSERT INTO prebuilds_settings (singleton) VALUES (true);

-- Transactional outbox: anything published because of a database change is written here in the
-- same transaction and relayed to RabbitMQ with publisher confirms after commit.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    message_id   uuid NOT NULL UNIQUE,
    routing_key  text NOT NULL,
    -- The whole CloudEvents envelope as it goes on the wire.
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- A relay leases rows before publishing so two relays never publish the same row concurrently;
    -- an expired lease (relay crashed mid-publish) makes the row eligible again.
    leased_until timestamptz,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Idempotency record for consumers whose effect is not naturally idempotent: the message id is
-- inserted in the same transaction as the effect, so a redelivery finds it and is acknowledged.
CREATE TABLE processed_messages (
    consumer     text NOT NULL,
    message_id   uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Claim requests by request id: a retried claim returns its first outcome.
CREATE TABLE claim_requests (
    request_id   uuid PRIMARY KEY,
    user_id      uuid,
    preset_id    uuid,
    outcome      text NOT NULL CHECK (outcome IN ('claimed', 'no_eligible_prebuild', 'rejected')),
    workspace_id uuid,
    reply        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX claim_requests_preset_time ON claim_requests (preset_id, created_at);

-- Reconcile bookkeeping per preset, kept apart from the preset row so that a reconcile never takes
-- a row lock a claim or the CLI might need.
CREATE TABLE preset_reconcile_state (
    preset_id          uuid PRIMARY KEY REFERENCES template_version_presets (id) ON DELETE CASCADE,
    -- Jobs requested before this instant are coalesced: the reconcile that finished at this time read
    -- a snapshot newer than anything they could ask for.
    last_reconciled_at timestamptz NOT NULL
);

-- The prebuilds system user (fixed id, as in Coder).
INSERT INTO users (id, username, email, is_system, rbac_roles)
VALUES ('c42fdf75-3097-471c-8c33-fb52454d81c0', 'prebuilds', 'prebuilds@system', true, '{}');

-- Coder's notification templates, with Coder's ids. Bodies use Go-template placeholders like
-- Coder's; dispatchers render them from the message's labels and data.
INSERT INTO notification_templates (id, name, title_template, body_template, "group") VALUES
('89d9745a-816e-4695-a17f-3d0a229e2b8d', 'Prebuilt Workspace Resource Replaced',
 'There might be a problem with a recently claimed prebuilt workspace',
 E'Workspace **{{.Labels.workspace}}** was claimed from a prebuilt workspace by **{{.Labels.claimant}}**.\n\n' ||
 E'During the claim, Terraform destroyed and recreated the following resources because one or more immutable attributes changed:\n\n' ||
 E'{{range $resource, $paths := .Data.replacements}}- _{{ $resource }}_ was replaced due to changes to _{{ $paths }}_\n{{end}}\n' ||
 E'When Terraform must change an immutable attribute, it replaces the entire resource. ' ||
 E'If you are using prebuilds to speed up provisioning, unexpected replacements slow down workspace start-up, even when claiming a prebuilt environment.\n\n' ||
 E'Template: {{.Labels.template}} / {{.Labels.template_version}}, preset {{.Labels.preset}}.',
 'Workspace Events'),
('414d9331-c1fc-4761-b40c-d1f4702279eb', 'Prebuild Failure Limit Reached',
 'There is a problem creating prebuilt workspaces',
 E'The number of failed prebuild attempts has reached the hard limit for template **{{.Labels.template}}** and preset **{{.Labels.preset}}**.\n\n' ||
 E'To resume prebuilds, fix the underlying issue and upload a new template version.',
 'Template Events');

-- Views shared by the reconciler, the claim statement, the scheduler and the CLI.

-- Latest build of every live workspace, with its job.
CREATE VIEW workspace_latest_builds AS
SELECT b.id, b.workspace_id, b.template_version_id, b.build_number, b.transition, b.initiator_id,
       b.job_id, b.template_version_preset_id, b.stage, b.created_at,
       j.job_status, j.started_at AS job_started_at, j.completed_at AS job_completed_at
FROM workspaces w
JOIN LATERAL (
    SELECT * FROM workspace_builds wb
    WHERE wb.workspace_id = w.id
    ORDER BY wb.build_number DESC
    LIMIT 1
) b ON true
JOIN provisioner_jobs j ON j.id = b.job_id
WHERE NOT w.deleted;

-- Live workspaces owned by the prebuilds user, with readiness and the preset they belong to.
CREATE VIEW workspace_prebuilds AS
SELECT w.id, w.name, w.template_id, w.organization_id, w.created_at,
       -- ready = every non-deleted agent of the latest build is 'ready'; false when there is none.
       COALESCE((
           SELECT bool_and(a.lifecycle_state = 'ready')
           FROM workspace_agents a
           WHERE a.job_id = lb.job_id AND NOT a.deleted
       ), false) AS ready,
       -- The preset of the most recent build that carries one (a delete build carries none).
       (SELECT pb.template_version_preset_id FROM workspace_builds pb
        WHERE pb.workspace_id = w.id AND pb.template_version_preset_id IS NOT NULL
        ORDER BY pb.build_number DESC LIMIT 1) AS current_preset_id
FROM workspaces w
JOIN workspace_latest_builds lb ON lb.workspace_id = w.id
WHERE w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' AND NOT w.deleted;
