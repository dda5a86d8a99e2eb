-- PostgreSQL roles of a prebuilds deployment, one per role, each granted exactly the tables that
-- role's SQL reads and writes (README "Least privilege" has the matrix and where it comes from).
--
-- Run it with psql as a superuser, connected to the prebuilds database, twice:
--
--   1. before `prebuildsctl migrate`: creates the roles, makes the operator the owner of the
--      database (migrate runs as the operator and so owns every table), and skips the table grants;
--   2. after every `prebuildsctl migrate`: grants the tables (the grants are replaced as a whole, so
--      a rerun leaves exactly what this file says).
--
--   psql -v ON_ERROR_STOP=1 -d prebuilds -f deploy/postgres/roles.sql \
--        [-v role_prefix=prebuilds_] [-v worker_password=…] [-v scheduler_password=…] \
--        [-v provisioner_password=…] [-v claims_password=…] [-v notifier_password=…] \
--        [-v api_password=…] [-v operator_password=…] [-v terraform_state_password=…] \
--        [-v terraform_state_schema=prebuilds_terraform_state]
--
-- Roles are <role_prefix><role>: prebuilds_operator (migrate and every other prebuildsctl
-- command), prebuilds_worker, prebuilds_scheduler, prebuilds_provisioner, prebuilds_notifier and
-- prebuilds_claims (what sends claim requests, e.g. `prebuildsctl claim`), prebuilds_api (the HTTP
-- API, `prebuilds-api`), and
-- prebuilds_terraform_state: the terraform backend's state store
-- (PREBUILDS_TERRAFORM_STATE_DATABASE_URL), which terraform and every template it runs can read,
-- so it owns the state schema (terraform_state_schema, default prebuilds_terraform_state, the
-- provisioner's default for AMQP prefix `prebuilds`) and nothing else: no table of the system of
-- record. A role without a password variable gets none
-- (for certificate, peer or trust authentication); given one, it is set on every run. Roles are
-- cluster-wide: several databases on one server need a role_prefix each.

\set ON_ERROR_STOP on
\if :{?role_prefix}
\else
    \set role_prefix prebuilds_
\endif
\set operator :role_prefix operator
\set worker :role_prefix worker
\set scheduler :role_prefix scheduler
\set provisioner :role_prefix provisioner
\set claims :role_prefix claims
\set api :role_prefix api
\set notifier :role_prefix notifier
\set terraform_state :role_prefix terraform_state
\if :{?terraform_state_schema}
\else
    \set terraform_state_schema prebuilds_terraform_state
\endif

-- 1. The roles: LOGIN and nothing else (no superuser, CREATEDB, CREATEROLE or replication).
SELECT format('CREATE ROLE %I LOGIN', name)
FROM unnest(ARRAY[:'operator', :'worker', :'scheduler', :'provisioner', :'claims', :'notifier', :'api',
                  :'terraform_state']) AS name
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name)
\gexec

\if :{?operator_password}
    ALTER ROLE :"operator" PASSWORD :'operator_password';
\endif
\if :{?worker_password}
    ALTER ROLE :"worker" PASSWORD :'worker_password';
\endif
\if :{?scheduler_password}
    ALTER ROLE :"scheduler" PASSWORD :'scheduler_password';
\endif
\if :{?provisioner_password}
    ALTER ROLE :"provisioner" PASSWORD :'provisioner_password';
\endif
\if :{?claims_password}
    ALTER ROLE :"claims" PASSWORD :'claims_password';
\endif
\if :{?api_password}
    ALTER ROLE :"api" PASSWORD :'api_password';
\endif
\if :{?notifier_password}
    ALTER ROLE :"notifier" PASSWORD :'notifier_password';
\endif
\if :{?terraform_state_password}
    ALTER ROLE :"terraform_state" PASSWORD :'terraform_state_password';
\endif

-- 2. The database: the operator owns it (and so, from PostgreSQL 15, schema public, where migrate
-- creates the tables); the others may connect and use the schema but create nothing. PUBLIC loses
-- CONNECT and TEMPORARY here, so no other role of the server gets in by default.
SELECT current_database() AS database \gset
ALTER DATABASE :"database" OWNER TO :"operator";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"worker", :"scheduler", :"provisioner", :"claims", :"notifier", :"api";
-- Before PostgreSQL 15 schema public belongs to the bootstrap superuser and PUBLIC may create in it.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"operator";
GRANT USAGE ON SCHEMA public TO :"worker", :"scheduler", :"provisioner", :"claims", :"notifier", :"api";
-- The terraform state role: CONNECT, and the state schema as its own (the provisioner creates the
-- state table in it at start-up); no USAGE on public, so it reaches no table of the system of record.
GRANT CONNECT ON DATABASE :"database" TO :"terraform_state";
CREATE SCHEMA IF NOT EXISTS :"terraform_state_schema" AUTHORIZATION :"terraform_state";
ALTER SCHEMA :"terraform_state_schema" OWNER TO :"terraform_state";

-- 3. The tables, once migrate has created them.
SELECT to_regclass('public.outbox') IS NOT NULL AS migrated,
       (SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'outbox')
           IS DISTINCT FROM :'operator' AS foreign_owner
\gset
\if :migrated
\if :foreign_owner
    \warn 'roles.sql: the tables are not owned by the operator role (they were migrated as another role): later migrations run as the operator will fail until they are (ALTER TABLE … OWNER TO).'
\endif
BEGIN;
-- Start from nothing, so the grants below are all there is (also after the matrix changed).
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"worker", :"scheduler", :"provisioner", :"claims", :"notifier", :"api";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"worker", :"scheduler", :"provisioner", :"claims", :"notifier", :"api";

-- Worker: reconcile (snapshot, creates, deletes, preset status and hard limits, watermarks,
-- capacity waits), provisioner events (job status, agents, logs, notifications, processed ids),
-- claims (claim records, the claim build) and the outbox relay (lease, mark published, clean up).
-- INSERT … RETURNING and UPDATE/DELETE … WHERE read the columns they name, and SELECT … FOR UPDATE
-- needs UPDATE: hence SELECT and UPDATE next to the writes.
GRANT SELECT ON organizations, users, templates, template_versions, template_version_parameters,
                template_version_preset_parameters, template_version_preset_prebuild_schedules,
                prebuilds_settings, organization_members, preset_activity
    TO :"worker";
GRANT SELECT, UPDATE ON template_version_presets TO :"worker";
GRANT SELECT, INSERT, UPDATE ON workspaces, provisioner_jobs, workspace_agents, preset_reconcile_state
    TO :"worker";
GRANT SELECT, INSERT ON workspace_builds, claim_requests, notification_messages TO :"worker";
GRANT INSERT ON processed_messages, provisioner_job_logs TO :"worker";
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox, preset_capacity_waits TO :"worker";
GRANT USAGE ON SEQUENCE outbox_id_seq, provisioner_job_logs_id_seq TO :"worker";

-- Scheduler: presets needing attention, the pause setting, and the pool-state metrics (the same
-- snapshot the worker reads, plus the created/failed/claimed counters); it publishes reconcile
-- jobs directly. Writes: the leader's job reaper fails silent jobs (status, error and times of
-- provisioner_jobs only; FOR UPDATE needs UPDATE) and requests reconciles through the outbox.
GRANT SELECT ON organizations, templates, template_versions, template_version_presets,
                template_version_preset_prebuild_schedules, prebuilds_settings, workspaces,
                workspace_builds, provisioner_jobs, workspace_agents, preset_activity,
                presets_needing_attention
    TO :"scheduler";
GRANT UPDATE (job_status, error, completed_at, updated_at) ON provisioner_jobs TO :"scheduler";
GRANT INSERT ON outbox TO :"scheduler";
GRANT USAGE ON SEQUENCE outbox_id_seq TO :"scheduler";
-- The leader's retention deletes rows past their windows (scheduler/src/retention.rs).
GRANT SELECT, DELETE ON processed_messages, claim_requests, provisioner_job_logs,
                        notification_messages, notification_deliveries
    TO :"scheduler";

-- Provisioner: a job's state before it runs and while it runs (admission, cancels of running jobs)
-- and, for the terraform backend, a version's source The sim backend connects only when given a
-- DATABASE_URL.
GRANT SELECT ON provisioner_jobs, template_versions TO :"provisioner";
-- ... and the parameters of a workspace's previous build, which a delete build destroys with.
GRANT SELECT (workspace_id, transition, build_number, parameters) ON workspace_builds TO :"provisioner";

-- Claim client (`prebuildsctl claim`): user and template names to ids; the claim itself is the
-- worker's transaction (which also checks organization membership, hence the worker's SELECT on
-- organization_members).
--
-- audit_log: only the operator, its owner, reads it (every prebuildsctl change writes its row in
-- the change's transaction); the API may only append to it.
GRANT SELECT ON users, templates, organizations TO :"claims";

-- Notifier: the notification a message names, its template and recipient; its own delivery
-- records (INSERT … ON CONFLICT DO UPDATE … RETURNING needs SELECT, INSERT and UPDATE).
GRANT SELECT ON notification_messages, notification_templates, users TO :"notifier";
GRANT SELECT, INSERT, UPDATE ON notification_deliveries TO :"notifier";

-- API (`prebuilds-api`): its tokens (read only: prebuildsctl, the operator, makes and revokes
-- them); the preset rows of `status` (the reconciler's snapshot and the claim history), templates
-- and jobs; the changes it offers — pause and resume (templates.paused, presets.paused, the
-- global setting), invalidate (presets.last_invalidated_at) — with their reconcile requests in
-- the outbox, which it relays itself after the commit (lease, mark published, clean up); and the
-- audit row of each change and claim (INSERT only: it cannot read or alter the log). FOR UPDATE on
-- templates and presets needs UPDATE; the claim itself is the worker's transaction, sent over the
-- claim RPC.
GRANT SELECT ON api_tokens, organizations, users, template_versions,
                template_version_preset_prebuild_schedules, workspaces, workspace_builds,
                provisioner_jobs, workspace_agents, claim_requests, workspace_prebuilds,
                preset_activity, presets_needing_attention
    TO :"api";
GRANT SELECT, UPDATE ON templates, template_version_presets, prebuilds_settings TO :"api";
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO :"api";
GRANT INSERT ON audit_log TO :"api";
GRANT USAGE ON SEQUENCE outbox_id_seq, audit_log_id_seq TO :"api";
COMMIT;
\else
\echo 'roles.sql: the roles exist; the schema is not migrated yet, so no table is granted: run `prebuildsctl migrate` as' :"operator" 'and then this script again.'
\endif
