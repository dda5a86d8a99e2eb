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

/// Inserts a user (optionally a template admin) and returns its id.
pub async fn user<C: GenericClient>(c: &C, username: &str, template_admin: bool) -> Uuid {
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

/// Inserts a template with an active version holding one preset with `desired` prebuilds.
pub async fn template_with_preset<C: GenericClient>(
    c: &C,
    organization_id: Uuid,
    template: &str,
    desired: Option<i32>,
) -> PresetFixture {
    let template_id = Uuid::new_v4();
    let version_id = Uuid::new_v4();
    let preset_id = Uuid::new_v4();
    c.execute(
        "INSERT INTO templates (id, organization_id, name) VALUES ($1, $2, $3)",
        &[&template_id, &organization_id, &template],
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
