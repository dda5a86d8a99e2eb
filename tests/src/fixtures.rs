//! Fixture builders for tests: organizations, users, templates, versions and presets inserted
//! directly, so tests state their world in a few lines.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// Inserts an organization and returns its id.
pub async fn organization<C: GenericClient>(c: &C, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    c.execute(
        "INSERT INTO organizations (id, name) VALUES ($1, $2)",
        &[&id, &name],
    )
    .await
    .expect("insert organization");
    id
}

/// Inserts a user (optionally a template admin) and returns its id. The user is a member of every
/// organization that exists at that moment (claims need membership of the template's
/// organization); [`outsider`] makes one who belongs to none.
pub async fn user<C: GenericClient>(c: &C, username: &str, template_admin: bool) -> Uuid {
    let id = outsider(c, username, template_admin).await;
    c.execute(
        "INSERT INTO organization_members (user_id, organization_id) SELECT $1, id FROM organizations",
        &[&id],
    )
    .await
    .expect("insert memberships");
    id
}

/// Adds `user` to organization `organization_id`.
pub async fn member<C: GenericClient>(c: &C, user: Uuid, organization_id: Uuid) {
    c.execute(
        "INSERT INTO organization_members (user_id, organization_id) VALUES ($1, $2)",
        &[&user, &organization_id],
    )
    .await
    .expect("insert membership");
}

/// Inserts a user who is a member of no organization and returns its id.
pub async fn outsider<C: GenericClient>(c: &C, username: &str, template_admin: bool) -> Uuid {
    let id = Uuid::new_v4();
    let roles: Vec<String> = if template_admin {
        vec!["template-admin".into()]
    } else {
        vec![]
    };
    c.execute(
        "INSERT INTO users (id, username, email, rbac_roles) VALUES ($1, $2, $3, $4)",
        &[&id, &username, &format!("{username}@example.com"), &roles],
    )
    .await
    .expect("insert user");
    id
}

/// A template with one active version and one preset.
#[derive(Debug, Clone, Copy)]
pub struct PresetFixture {
    pub organization_id: Uuid,
    pub template_id: Uuid,
    pub version_id: Uuid,
    pub preset_id: Uuid,
}

/// Inserts a template with one active version `v1`; returns (template id, version id).
pub async fn template<C: GenericClient>(c: &C, organization_id: Uuid, name: &str) -> (Uuid, Uuid) {
    let template_id = Uuid::new_v4();
    let version_id = Uuid::new_v4();
    c.execute(
        "INSERT INTO templates (id, organization_id, name) VALUES ($1, $2, $3)",
        &[&template_id, &organization_id, &name],
    )
    .await
    .expect("insert template");
    c.execute(
        "INSERT INTO template_versions (id, template_id, name) VALUES ($1, $2, 'v1')",
        &[&version_id, &template_id],
    )
    .await
    .expect("insert version");
    c.execute(
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[&version_id, &template_id],
    )
    .await
    .expect("activate version");
    (template_id, version_id)
}

/// Inserts a template with an active version holding one preset with `desired` prebuilds.
pub async fn template_with_preset<C: GenericClient>(
    c: &C,
    organization_id: Uuid,
    template_name: &str,
    desired: Option<i32>,
) -> PresetFixture {
    let (template_id, version_id) = template(c, organization_id, template_name).await;
    let preset_id = Uuid::new_v4();
    c.execute(
        "INSERT INTO template_version_presets (id, template_version_id, name, desired_instances)
         VALUES ($1, $2, 'default', $3)",
        &[&preset_id, &version_id, &desired],
    )
    .await
    .expect("insert preset");
    PresetFixture {
        organization_id,
        template_id,
        version_id,
        preset_id,
    }
}

/// The latest build a fixture prebuild has.
#[derive(Debug, Clone)]
pub struct PrebuildSpec {
    /// Transition of the latest build (`start` = build #1 only; otherwise build #1 is a successful
    /// start and build #2 has this transition without a preset, as the reconciler makes them).
    pub transition: &'static str,
    pub job_status: &'static str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Adds one agent, ready or not, to the latest build when it is a successful start.
    pub ready: bool,
}

impl PrebuildSpec {
    pub fn running(created_at: chrono::DateTime<chrono::Utc>) -> Self {
        PrebuildSpec {
            transition: "start",
            job_status: "succeeded",
            created_at,
            ready: true,
        }
    }
}

/// Inserts a prebuild of `fx`'s preset (owned by the prebuilds user) and returns its id.
pub async fn prebuild<C: GenericClient>(c: &C, fx: &PresetFixture, spec: &PrebuildSpec) -> Uuid {
    prebuild_on(c, fx, fx.version_id, spec).await
}

/// As [`prebuild`], built on `version_id`.
pub async fn prebuild_on<C: GenericClient>(
    c: &C,
    fx: &PresetFixture,
    version_id: Uuid,
    spec: &PrebuildSpec,
) -> Uuid {
    let owner = prebuilds_schemas::PREBUILDS_USER_ID;
    let workspace_id = Uuid::new_v4();
    let name = format!("prebuild-{}", &workspace_id.simple().to_string()[..15]);
    c.execute(
        "INSERT INTO workspaces (id, owner_id, organization_id, template_id, name, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &workspace_id,
            &owner,
            &fx.organization_id,
            &fx.template_id,
            &name,
            &spec.created_at,
        ],
    )
    .await
    .expect("insert workspace");
    let single = spec.transition == "start";
    let first_status = if single { spec.job_status } else { "succeeded" };
    let first_job = insert_job(c, first_status, spec.created_at).await;
    insert_build(
        c,
        workspace_id,
        version_id,
        1,
        "start",
        first_job,
        Some(fx.preset_id),
        spec.created_at,
    )
    .await;
    let latest_job = if single {
        first_job
    } else {
        let job = insert_job(c, spec.job_status, spec.created_at).await;
        insert_build(
            c,
            workspace_id,
            version_id,
            2,
            spec.transition,
            job,
            None,
            spec.created_at,
        )
        .await;
        job
    };
    if spec.transition == "start" && spec.job_status == "succeeded" {
        let state = if spec.ready { "ready" } else { "starting" };
        c.execute(
            "INSERT INTO workspace_agents (id, job_id, name, lifecycle_state) VALUES ($1, $2, 'main', $3)",
            &[&Uuid::new_v4(), &latest_job, &state],
        )
        .await
        .expect("insert agent");
    }
    workspace_id
}

async fn insert_job<C: GenericClient>(
    c: &C,
    status: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Uuid {
    let id = Uuid::new_v4();
    let done = matches!(status, "succeeded" | "failed" | "canceled");
    let started = status != "pending";
    c.execute(
        "INSERT INTO provisioner_jobs (id, initiator_id, job_status, created_at, started_at, completed_at)
         VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN $4::timestamptz END, CASE WHEN $6 THEN $4::timestamptz END)",
        &[&id, &prebuilds_schemas::PREBUILDS_USER_ID, &status, &at, &started, &done],
    )
    .await
    .expect("insert job");
    id
}

#[allow(clippy::too_many_arguments)]
async fn insert_build<C: GenericClient>(
    c: &C,
    workspace_id: Uuid,
    version_id: Uuid,
    number: i32,
    transition: &str,
    job_id: Uuid,
    preset_id: Option<Uuid>,
    at: chrono::DateTime<chrono::Utc>,
) {
    c.execute(
        "INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition,
                                       initiator_id, job_id, template_version_preset_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &Uuid::new_v4(),
            &workspace_id,
            &version_id,
            &number,
            &transition,
            &prebuilds_schemas::PREBUILDS_USER_ID,
            &job_id,
            &preset_id,
            &at,
        ],
    )
    .await
    .expect("insert build");
}

/// Adds a new version to the fixture's template (with a copy of the preset) and activates it.
/// Returns the new preset's fixture.
pub async fn new_active_version<C: GenericClient>(
    c: &C,
    fx: &PresetFixture,
    desired: Option<i32>,
) -> PresetFixture {
    let version_id = Uuid::new_v4();
    let preset_id = Uuid::new_v4();
    c.execute(
        "INSERT INTO template_versions (id, template_id, name) VALUES ($1, $2, $3)",
        &[
            &version_id,
            &fx.template_id,
            &format!("v-{}", &version_id.simple().to_string()[..8]),
        ],
    )
    .await
    .expect("insert version");
    c.execute(
        "INSERT INTO template_version_presets (id, template_version_id, name, desired_instances)
         VALUES ($1, $2, 'default', $3)",
        &[&preset_id, &version_id, &desired],
    )
    .await
    .expect("insert preset");
    c.execute(
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[&version_id, &fx.template_id],
    )
    .await
    .expect("activate");
    PresetFixture {
        version_id,
        preset_id,
        ..*fx
    }
}

/// The stored log lines of a job, oldest first; only those of `level` when given.
pub async fn job_log_lines<C: GenericClient>(c: &C, job: Uuid, level: Option<&str>) -> Vec<String> {
    c.query(
        "SELECT output FROM provisioner_job_logs
         WHERE job_id = $1 AND ($2::text IS NULL OR level = $2) ORDER BY id",
        &[&job, &level],
    )
    .await
    .expect("read job logs")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Outbox messages not yet published by a relay.
pub async fn unpublished_outbox<C: GenericClient>(c: &C) -> Result<i64, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The provisioner job of `workspace`'s latest build.
pub async fn latest_job<C: GenericClient>(c: &C, workspace: Uuid) -> Uuid {
    c.query_one(
        "SELECT job_id FROM workspace_builds WHERE workspace_id = $1
         ORDER BY build_number DESC LIMIT 1",
        &[&workspace],
    )
    .await
    .expect("the workspace has a build")
    .get(0)
}
